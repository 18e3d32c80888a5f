"""The training and evaluation engine: torchrun data parallelism, resuming, checkpoints,
and a training run that learns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import engine_overrides
from safetensors.torch import load_file

from lads.config import load_config
from lads.errors import LadsError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _write_overrides(tmp_path, name, overrides) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(overrides))
    return path


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path, tiny_text_dir, synth_data):
    """Two gloo ranks (micro-batch 4 each) end with identical weights, equal to one process
    with the same global batch of 8 (micro-batch 4, two accumulation steps); distributed
    evaluation of 7 expressions counts each exactly once."""
    common = engine_overrides(tiny_text_dir, synth_data, tmp_path / "unused") + [
        "train.epochs=2", "train.batch_size=8", "train.micro_batch=4", "train.checkpoint_every=1000"]
    runs = {}
    for name, launcher in {
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
        "one": [sys.executable],
    }.items():
        out = tmp_path / name
        out.mkdir()
        spec = _write_overrides(tmp_path, name, common + [f"train.out={out / 'run'}"])
        done = subprocess.run([*launcher, str(ROOT / "tests" / "dist_worker.py"), str(spec), str(out)],
                              env=ENV, timeout=300, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = out
    rank0, rank1 = (load_file(str(runs["two"] / f"rank{r}.safetensors")) for r in (0, 1))
    single = load_file(str(runs["one"] / "rank0.safetensors"))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    for r in (0, 1):
        counted = json.loads((runs["two"] / f"eval{r}.json").read_text())
        assert counted == {"expressions": 7, "world": 2}
    assert json.loads((runs["one"] / "eval0.json").read_text()) == {"expressions": 7, "world": 1}


def _train_cmd(config_overrides, resume=None):
    cmd = [sys.executable, "-m", "lads.cli", "train", "--config", "tiny"]
    for o in config_overrides:
        cmd += ["--set", o]
    return cmd + (["--resume", str(resume)] if resume else [])


def _log_steps(run: Path) -> int:
    log = run / "log.jsonl"
    if not log.exists():
        return 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return lines[-1]["step"] if lines else 0


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted(tmp_path, tiny_text_dir, synth_data):
    """SIGTERM mid-training writes a checkpoint and exits cleanly; resuming it reaches the
    weights of an uninterrupted run of the same length."""
    common = engine_overrides(tiny_text_dir, synth_data, tmp_path) + [
        "train.epochs=6", "train.batch_size=4", "train.micro_batch=4", "train.checkpoint_every=1000"]
    full = tmp_path / "full"
    subprocess.run(_train_cmd(common + [f"train.out={full}"]), env=ENV, check=True, timeout=300, capture_output=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_train_cmd(common + [f"train.out={cut}"]), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 200
    while _log_steps(cut) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, output
    meta = json.loads((cut / "checkpoint" / "meta.json").read_text())
    assert meta["reason"] == "SIGTERM"
    total = meta["total_steps"]
    assert 5 <= meta["step"] < total, "the run was not interrupted mid-training"

    subprocess.run(_train_cmd([], resume=cut), env=ENV, check=True, timeout=300, capture_output=True)
    resumed = json.loads((cut / "checkpoint" / "meta.json").read_text())
    assert resumed["step"] == total and resumed["reason"] == "finished"
    a = load_file(str(full / "checkpoint" / "model.safetensors"))
    b = load_file(str(cut / "checkpoint" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_training_loss_falls_and_precision_rises(trained, tiny_text_dir, synth_data):
    """The loss falls markedly and Prec@0.5 on the training images rises far above chance."""
    from lads.engine import evaluate, load_split
    from lads.models import LADS
    from lads.models.pretrained import load_model
    from lads.models.text import load_tokenizer

    checkpoint, cfg = trained
    log = [json.loads(line) for line in (checkpoint.parent / "log.jsonl").read_text().splitlines()]
    first, last = sum(r["l1"] + r["giou"] for r in log[:3]) / 3, sum(r["l1"] + r["giou"] for r in log[-3:]) / 3
    assert last < 0.5 * first, (first, last)

    tokenizer = load_tokenizer(tiny_text_dir)
    dataset = load_split(cfg, "train", False, tokenizer)
    torch.manual_seed(0)
    untrained = evaluate(LADS(cfg.model).eval(), dataset, batch_size=16, mode="masked", progress=False)
    model, _ = load_model(checkpoint)
    after = evaluate(model, dataset, batch_size=16, mode="masked", progress=False)
    assert after["expressions"] == len(dataset)
    assert after["prec@0.5"] >= 40 and after["prec@0.5"] >= untrained["prec@0.5"] + 30, (untrained, after)


def test_checkpoint_round_trip_and_damage(trained, tmp_path, synth_data):
    """from_pretrained predicts exactly what the trained model predicts; a truncated or
    partial checkpoint, or one from another config, is refused with a message."""
    import shutil

    from lads.datasets import load_records
    from lads.models import LADS
    from lads.models.pretrained import load_model
    from lads.util.checkpoint import load_training_state, load_weights, read_meta, resolve_checkpoint

    checkpoint, cfg = trained
    records, _ = load_records(synth_data, "test")
    model_a, _ = load_model(checkpoint)
    model_b = LADS.from_pretrained(checkpoint)
    image, expressions = records[0].image, [r.expression for r in records if r.image == records[0].image]
    first = model_a.predict(image, expressions)
    assert first == model_b.predict(image, expressions)

    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LadsError, match="truncated"):
        read_meta(damaged)
    meta = json.loads((damaged / "meta.json").read_text())  # even when meta.json agrees
    meta["files"]["model.safetensors"] = weights.stat().st_size
    (damaged / "meta.json").write_text(json.dumps(meta))
    _, _, _ = read_meta(damaged)
    with pytest.raises(LadsError, match="model.safetensors"):
        load_weights(damaged, model_a)

    partial = tmp_path / "partial"
    shutil.copytree(checkpoint, partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(LadsError, match="partial: model.safetensors is missing"):
        LADS.from_pretrained(partial)
    shared = tmp_path / "shared"  # no optimizer state (save_pretrained, the Hub): loads, does not resume
    shutil.copytree(checkpoint, shared)
    (shared / "training_state.pt").unlink()
    assert LADS.from_pretrained(shared).predict(image, expressions) == first
    with pytest.raises(LadsError, match="holds no training state"):
        load_training_state(resolve_checkpoint(shared))
    with pytest.raises(LadsError, match="no such folder"):
        LADS.from_pretrained(tmp_path / "missing")

    other = load_config("tiny", [f"model.text.name={cfg.model.text.name}", "model.fusion.num_layers=1",
                                 "model.text.num_layers=2", "model.visual.width=8", "model.fusion.d_model=32",
                                 "model.fusion.num_heads=2", "model.fusion.ffn_dim=64", "model.gating.hidden=8"])
    with pytest.raises(LadsError, match="does not fit"):
        load_weights(checkpoint, LADS(other.model))
