"""benchmarks/head_probe.py: a short run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import BENCHMARKS, engine_overrides

SCRIPT = BENCHMARKS / "head_probe.py"


def test_short_run_writes_three_probes(tmp_path, tiny_text_dir, synth_data):
    out = tmp_path / "probe"
    overrides = [o for o in engine_overrides(tiny_text_dir, synth_data, tmp_path / "unused") if o.startswith("model.")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SCRIPT.parents[1])}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", synth_data, "--pretrained", "none", "--seconds", "1",
         "--out", str(out), *(a for o in overrides for a in ("--set", o))],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((out / "probe.json").read_text())
    assert [p["probe"] for p in result["probes"]] == ["box", "oracle", "cells"]
    assert all(p["steps"] >= 1 and 0 <= p["val"] <= 1 for p in result["probes"])
    assert -1 <= result["text"]["cls_mean_cosine"] <= 1 + 1e-6
    assert len((out / "probe.md").read_text().splitlines()) == 2 + 3
