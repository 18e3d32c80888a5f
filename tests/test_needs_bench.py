"""benchmarks/needs.py: each gated layer skipped alone, Prec@0.5 per expression type."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import BENCHMARKS, load_benchmark

SCRIPT = BENCHMARKS / "needs.py"


@pytest.fixture(scope="module")
def needs():
    return load_benchmark("needs")


def test_drops_correlations_and_cheapest_layers(needs):
    # whole network, then two layers; expressions: types a, a, b, b
    hits = np.array([[1, 1, 1, 1],
                     [0, 1, 1, 1],   # "x" costs a 50 points, b nothing
                     [1, 1, 0, 0]],  # "y" costs b 100 points, a nothing
                    dtype=float)
    result = needs.summarise(["whole network", "x", "y"], hits, ["a", "a", "b", "b"], [1.0, 0.9, 0.8])
    x, y = result["layers"]
    assert (x["layer"], x["flops"], y["flops"]) == ("x", 0.9, 0.8)
    assert x["drop"] == {"all": 25.0, "a": 50.0, "b": 0.0} and y["drop"] == {"all": 50.0, "a": 0.0, "b": 100.0}
    assert result["correlation"]["a"]["b"] == pytest.approx(-1.0)
    assert result["cheapest_for_all"] == "x"
    assert result["cheapest"]["b"] == {"layer": "x", "drop": 0.0, "drop_of_cheapest_for_all": 0.0}
    assert result["cheapest"]["a"] == {"layer": "y", "drop": 0.0, "drop_of_cheapest_for_all": 50.0}
    assert result["counts"] == {"a": 2, "b": 2}


def test_the_whole_network_is_the_dense_evaluation_and_every_layer_costs_flops(needs, trained, synth_data):
    from lads.engine import evaluate, load_split
    from lads.models.pretrained import load_model
    from lads.models.text import load_tokenizer

    model, cfg = load_model(trained[0])
    cfg.data.path = synth_data
    dataset = load_split(cfg, "train", False, load_tokenizer(model.config.text.name))
    names, hits, types, flops = needs.correct_by_arm(model, dataset, batch_size=4)
    assert names[0] == "whole network" and len(names) == 1 + model.layout.num_layer_gates
    assert hits.shape == (len(names), len(dataset)) and len(types) == len(dataset)
    assert hits[0].sum() == evaluate(model, dataset, mode="dense", progress=False)["correct"]
    assert flops[0] == 1.0 and all(0 < f < 1 for f in flops[1:])


@pytest.mark.slow
def test_the_script_writes_its_table_and_picture(trained, synth_data, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SCRIPT.parents[1])}
    run = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(trained[0]), "--data", synth_data,
                          "--split", "train", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "needs.json").read_text())
    assert result["meta"]["split"] == "train" and len(result["layers"]) >= 1
    assert "| layer skipped |" in (tmp_path / "needs.md").read_text()
    assert (tmp_path / "needs.png").stat().st_size > 0
