"""Sharing models: ``from_pretrained`` by Hub id from a Hub cache laid out on the spot (offline, as
``huggingface_hub`` lays it out), ``save_pretrained``, and the model card's figures."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from lads.models import LADS
from lads.util.checkpoint import read_meta

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"

OFFLINE_LOAD = """
import json, sys
import lads
from lads.errors import LadsError
out = {}
for revision in (None, sys.argv[1]):
    model = lads.LADS.from_pretrained("lads-org/tiny-demo", revision=revision)
    out[str(revision)] = sum(float(p.double().sum()) for p in model.state_dict().values() if p.is_floating_point())
try:
    lads.LADS.from_pretrained("lads-org/no-such-model")
except LadsError as e:
    out["missing"] = str(e)
print(json.dumps(out))
"""


def hub_cache(tmp_path: Path, checkpoint) -> Path:
    """The layout ``huggingface_hub`` keeps: refs/main names a commit, snapshots/COMMIT holds the files."""
    repo = tmp_path / "hub" / "models--lads-org--tiny-demo"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(checkpoint, repo / "snapshots" / COMMIT, ignore=shutil.ignore_patterns("training_state.pt"))
    return tmp_path / "hub"


def checksum(model) -> float:
    return sum(float(p.double().sum()) for p in model.state_dict().values() if p.is_floating_point())


def test_hub_id_loads_offline_from_the_cache(trained, tmp_path):
    """With HF_HUB_OFFLINE=1 and HF_HUB_CACHE set, ``from_pretrained("org/name")`` (and at a
    commit) loads the cached snapshot; an id not in the cache is one ``LadsError`` that names it
    and says the cache alone was read."""
    cache = hub_cache(tmp_path, trained[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", OFFLINE_LOAD, COMMIT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = checksum(LADS.from_pretrained(trained[0]))
    assert out["None"] == expected and out[COMMIT] == expected
    assert out["missing"].startswith("lads-org/no-such-model: no such local folder, and no such model on the "
                                     "Hugging Face Hub (HF_HUB_OFFLINE is set: only the local cache is read)")


def test_save_pretrained_round_trip(trained, tmp_path):
    """``save_pretrained`` writes a folder without the optimizer state that loads to the same
    weights, with the checkpoint's config and meta and a card naming the preset and data."""
    model = LADS.from_pretrained(trained[0])
    folder = model.save_pretrained(tmp_path / "shared")
    assert not (folder / "training_state.pt").exists()
    assert checksum(LADS.from_pretrained(folder)) == checksum(model)
    _, config, meta = read_meta(folder)
    _, original_config, original_meta = read_meta(trained[0])
    assert config == original_config and meta["step"] == original_meta["step"]
    card = (folder / "README.md").read_text()
    assert "library_name: lads" in card and f"# LADS — tiny, trained on {Path(config['data']['path']).name}" in card
    assert f"{meta['step']} steps of {config['train']['batch_size']}" in card and "@inproceedings" in card


def test_card_figures_are_the_checkpoints_own(trained, tiny_text_dir, synth_data, tmp_path):
    """The card gives the last validation of training (as in log.jsonl) and, after ``lads
    eval``, its table (as in its JSON) without breaking the checkpoint's file check; a copy
    shared with ``save_pretrained`` keeps the figures while its weights are those evaluated."""
    from helpers import engine_overrides

    from lads.config import load_config
    from lads.engine import train

    run = tmp_path / "run"
    checkpoint = train(load_config("tiny", engine_overrides(tiny_text_dir, synth_data, run) + [
        "train.max_steps=4", "train.epochs=100", "train.batch_size=4", "train.micro_batch=4", "train.eval_every=0.5"]))
    last = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "val/prec@0.5" in line][-1]
    card = (checkpoint / "README.md").read_text()
    assert f"During training, at step {last['step']}: val Prec@0.5 {last['val/prec@0.5']:.2f}" in card
    assert "Not evaluated yet" in card

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lads.cli", "eval", "--checkpoint", str(checkpoint), "--splits", "val",
                           "test", "--out", str(tmp_path / "table")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads((tmp_path / "table.json").read_text())[0]
    card = (checkpoint / "README.md").read_text()
    for split, r in row["splits"].items():
        assert re.search(rf"\| {split} \| {r['expressions']} \| {r['prec@0.5']:.2f} \| {100 * r['flops_kept']:.0f} % "
                         rf"\| {r['ms_per_expression']:.1f} \|", card), split
    assert row["device"] in card
    read_meta(checkpoint)  # the card and eval.json are not files the checkpoint check counts

    model = LADS.from_pretrained(checkpoint)
    assert (f"| {row['splits']['test']['prec@0.5']:.2f} |"
            in (model.save_pretrained(tmp_path / "a") / "README.md").read_text())
    with torch.no_grad():
        model.head.layers[-1].bias.add_(0.1)  # no longer the weights evaluated
    assert "Not evaluated yet" in (model.save_pretrained(tmp_path / "b") / "README.md").read_text()
