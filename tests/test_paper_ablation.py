"""benchmarks/paper_ablation.py: two arms of a few steps, the second reusing the first's stage 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SMALL_DEMO

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_ablation.py"


@pytest.mark.slow
def test_an_arm_without_the_eq9_stage_starts_from_the_recipes_stage_1(tmp_path, tiny_text_dir):
    work, out = tmp_path / "work", tmp_path / "out"
    overrides = [*SMALL_DEMO, "demo.cls_steps=2", f"model.text.name={tiny_text_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SCRIPT.parents[1])}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(work), "--out", str(out), "--arms", "recipe", "no-eq9-stage",
         *(a for o in overrides for a in ("--set", o))],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    arm = work / "no-eq9-stage"
    assert (arm / "shared").resolve() == (work / "recipe" / "shared").resolve()
    assert not (arm / "eq9").exists() and (work / "recipe" / "eq9" / "checkpoint").exists()
    config = json.loads((arm / "lads" / "checkpoint" / "config.json").read_text())
    assert config["model"]["init"] == str(arm / "shared" / "checkpoint")
    assert config["train"]["max_steps"] == 2 + 2  # the steps of the recipe's stages 1b and 2
    table = (out / "ablation.md").read_text()
    assert "| recipe | nothing" in table and "| no-eq9-stage | the dense Eq. 9 stage" in table
    done = json.loads((out / "ablation.json").read_text())
    assert set(done) == {"recipe", "no-eq9-stage"} and done["no-eq9-stage"]["dense_eq9_test"] is None
    assert 0 <= done["recipe"]["test"] <= 100 and (out / "curves.png").stat().st_size > 0
