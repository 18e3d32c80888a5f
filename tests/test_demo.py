"""``lads demo`` end to end on a few steps: stages, report, learning curves, rerun, a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SMALL_DEMO

from lads.cli import main as lads_main
from lads.config import DemoConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_end_to_end_then_rerun_reuses(tmp_path, tiny_text_dir, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out)]
    for o in [*SMALL_DEMO, f"model.text.name={tiny_text_dir}"]:
        args += ["--set", o]
    assert lads_main(args) == 0
    report = (out / "report.md").read_text()
    for row in ("LADS (lads), token head", "LADS (lads), [CLS] head (paper)", "static control (static), token head",
                "dense (dense), token head"):
        assert row in report
    assert "| stage 2: static control |" in report and "Do the subnets follow the expression?" in report
    assert "To repeat these steps: `lads demo --set demo.fit_to_machine=false --set pretrain.steps=2 " \
           "--set demo.shared_steps=3 --set demo.steps=2`" in report
    assert "| stage 1: dense, shared |" in report and "| stage 2: LADS |" in report
    assert "| pre-training of the visual backbone | 2 |" in report and "| stage 1: dense, shared | 3 |" in report
    assert "**warning**" not in report  # every stage ran its steps within its cap
    assert "| float32 |" in report or "| bf16 |" in report  # train.amp=auto, as this CPU does it
    assert (out / "curves.png").stat().st_size > 0 and "curves.png" in report
    rows = json.loads((out / "results.json").read_text())
    assert [set(r["splits"]) for r in rows] == [{"test", "heldout"}] * 3
    lads_meta = json.loads((out / "lads" / "checkpoint" / "config.json").read_text())
    assert lads_meta["model"]["init"] == str(out / "shared" / "checkpoint")  # stage 2 starts from stage 1
    shared = json.loads((out / "shared" / "checkpoint" / "config.json").read_text())["model"]
    dense = json.loads((out / "dense" / "checkpoint" / "config.json").read_text())["model"]
    assert shared["layer_drop_fusion"] == DemoConfig().layer_drop_fusion > 0  # LayerDrop in stage 1 only
    assert dense["layer_drop_fusion"] == lads_meta["model"]["layer_drop_fusion"] == 0
    static = json.loads((out / "static" / "checkpoint" / "config.json").read_text())["model"]
    assert static["gating"]["static"] and not lads_meta["model"]["gating"]["static"]
    assert static["init"] == lads_meta["model"]["init"]  # the same stage 1, the same steps after
    capsys.readouterr()

    meta = json.loads((out / "pretrain" / "meta.json").read_text())
    (out / "pretrain" / "meta.json").write_text(json.dumps({**meta, "steps": 1}))  # as if cut by its cap
    assert lads_main(args) == 0  # a rerun trains nothing again
    printed = capsys.readouterr().out
    assert printed.count("done already") == 4 and "reusing the synthetic benchmark" in printed
    assert "reusing the step budget" in printed
    report = (out / "report.md").read_text()
    assert "- **warning**: pre-training of the visual backbone reached its time cap after 1 of its 2 steps" in report


@pytest.mark.slow
def test_paper_recipe_trains_eq9_alone_then_lads_from_it(tmp_path, tiny_text_dir):
    """``--config tiny-paper``: stage 1 with the token head as a training-only teacher, a dense
    stage with Eq. 9 alone (no token head: left behind at its init), then LADS from it; both
    evaluated with the paper's [CLS] head, the dense stage as the dense row."""
    from safetensors import safe_open

    out = tmp_path / "paper"
    args = ["demo", "--config", "tiny-paper", "--out", str(out)]
    for o in [*SMALL_DEMO, "demo.cls_steps=2", f"model.text.name={tiny_text_dir}"]:
        args += ["--set", o]
    assert lads_main(args) == 0
    config = {run: json.loads((out / run / "checkpoint" / "config.json").read_text())["model"]
              for run in ("shared", "eq9", "lads")}
    assert config["shared"]["loss"]["token"] == 1.0 and config["eq9"]["loss"]["token"] == 0.0
    assert config["eq9"]["dense"] and config["eq9"]["init"] == str(out / "shared" / "checkpoint")
    assert not config["lads"]["dense"] and config["lads"]["init"] == str(out / "eq9" / "checkpoint")
    assert config["lads"]["head"] == "cls" and config["lads"]["loss"]["flops_target"] == 0.7
    assert config["shared"]["layer_drop_fusion"] == 0  # without LayerDrop: +6 points for the [CLS] head
    with safe_open(str(out / "lads" / "checkpoint" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("token_head.") for k in f.keys())  # the paper's model, its own head
    assert not (out / "static").exists() and not (out / "dense").exists()
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["dense (eq9)", "LADS (lads)"]
    assert all(set(r["splits"][s]["prec@0.5_by_head"]) == {"cls"} for r in rows for s in ("test", "heldout"))
    report = (out / "report.md").read_text()
    assert "LADS (lads), [CLS] head (paper)" in report and "dense (eq9), [CLS] head (paper)" in report
    assert "| stage 1b: dense, Eq. 9 alone | 2 |" in report and "static control" not in report.split("## Training")[1]
    assert "To repeat these steps: `lads demo --config tiny-paper --set demo.fit_to_machine=false" in report
    assert "--set demo.cls_steps=2" in report and (out / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_a_signal_stops_the_whole_demo_and_a_rerun_resumes_it(tmp_path, tiny_text_dir):
    out = tmp_path / "demo"
    overrides = [*SMALL_DEMO, "demo.shared_steps=100000", "demo.shared_minutes=0.5", f"model.text.name={tiny_text_dir}"]
    command = [sys.executable, "-m", "lads.cli", "demo", "--out", str(out), *sum((["--set", o] for o in overrides), [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("[4/11]"):
            break
    deadline = time.time() + 60
    while not (out / "shared" / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)  # stage 1 has started training
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert "stopped by SIGTERM during stage 1" in stderr and "run the demo again" in stderr
    assert "[5/11]" not in stdout and not (out / "lads").exists() and not (out / "report.md").exists()
    assert json.loads((out / "shared" / "checkpoint" / "meta.json").read_text())["reason"] == "SIGTERM"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stdout + rerun.stderr and (out / "report.md").exists()


@pytest.mark.parametrize("reference, scale", [(1e-9, 0.25), (1e9, 8.0)])
def test_step_budget_is_fitted_to_the_machine_within_bounds(tmp_path, tiny_text_dir, synth_data, reference, scale):
    """A real probe of training steps; the reference machine's step time set so far off that
    the factor is clamped, so the steps are known: the preset's × the bound, rounded."""
    from lads.demo import step_budget

    overrides = [o for o in SMALL_DEMO if not o.startswith("demo.fit")] + [
        f"model.text.name={tiny_text_dir}", f"data.path={synth_data}", "demo.shared_steps=40",
        "demo.steps=20", "pretrain.steps=12", f"demo.reference_step_s={reference}"]
    budget = step_budget(tmp_path, "tiny", overrides)
    assert budget["probe_step_s"] > 0 and budget["scale"] == scale
    assert budget["steps"] == {k: round(v * scale) for k, v in
                               {"pretrain.steps": 12, "demo.shared_steps": 40, "demo.steps": 20}.items()}
    saved = json.loads((tmp_path / "budget.json").read_text())
    assert saved == budget and saved["overrides"][0] == "demo.fit_to_machine=false"
    assert step_budget(tmp_path, "tiny", []) == budget  # a rerun keeps the steps it chose
