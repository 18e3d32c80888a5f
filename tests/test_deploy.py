"""The dynamic model deployed (``lads export --bank``, ``lads.deploy``): a bank written for a
split's gate patterns, run by onnxruntime in a process where torch cannot be imported, with the
boxes of PyTorch; expressions routed to their own subnet, a superset, or the dense network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import queries_by_image
from test_predict import ENV, lads_cli

from lads import LADS
from lads.datasets import load_records
from lads.deploy import BANK_INDEX, Deployment, _bits
from lads.errors import LadsError
from lads.inference import tokenize

BLOCKED = """
import json, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process")
sys.meta_path.insert(0, NoTorch())
from lads.deploy import Deployment
deployment = Deployment(sys.argv[1], threads=1)
answers = [deployment.predict(image, expressions) for image, expressions in json.loads(sys.argv[2])]
assert "torch" not in sys.modules
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def model(trained):
    return LADS.from_pretrained(trained[0])


@pytest.fixture(scope="module")
def queries(synth_data):
    return queries_by_image(synth_data, "val")


@pytest.fixture(scope="module")
def bank(trained, synth_data, tmp_path_factory):
    """``lads export --bank`` of the val split at coverage 0.6: (folder, what it printed)."""
    out = tmp_path_factory.mktemp("deploy") / "bank"
    done = lads_cli("export", "--checkpoint", trained[0], "--bank", "--data", synth_data, "--split", "val",
                    "--coverage", "0.6", "--out", out)
    assert done.returncode == 0, done.stderr
    return out, done.stdout


def test_the_bank_holds_the_most_frequent_patterns_up_to_the_coverage(bank, model, synth_data):
    folder, printed = bank
    index = json.loads((folder / BANK_INDEX).read_text())
    expressions = [r.expression for r in load_records(synth_data, "val")[0]]
    counts = [s["expressions"] for s in index["subnets"]]
    assert counts == sorted(counts, reverse=True) and sum(counts) >= 0.6 * len(expressions)
    assert sum(counts[:-1]) < 0.6 * len(expressions)  # no more than needed
    assert index["split"] == {"data": str(synth_data), "split": "val", "expressions": len(expressions),
                              "patterns": index["split"]["patterns"], "coverage": 0.6,
                              "covered": round(sum(counts) / len(expressions), 6)}
    for entry in [*index["subnets"], index["dense"]]:
        assert (folder / entry["file"]).is_file()
    assert _bits(index["dense"]["pattern"], index["layer_gates"] + index["filter_gates"]).all()
    assert index["max_abs_diff"] < 1e-4
    assert f"{len(index['subnets'])} subnets of {index['split']['patterns']} gate patterns" in printed
    assert "checked: onnxruntime boxes match PyTorch's" in printed
    assert not list(folder.parent.glob("bank.tmp-*"))


def test_runtime_without_torch_gives_pytorchs_boxes(bank, model, queries):
    """In a process that cannot import torch: the boxes of model.predict for every expression
    its own subnet serves; every expression is served one of the three ways."""
    done = subprocess.run([sys.executable, "-c", BLOCKED, str(bank[0]), json.dumps(queries)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    deployed = [a for answers in json.loads(done.stdout) for a in answers]
    expected = [p for image, expressions in queries for p in model.predict(image, expressions)]
    assert len(deployed) == len(expected)
    assert {a["served"] for a in deployed} <= {"own", "superset", "dense"}
    own = [(a, p) for a, p in zip(deployed, expected) if a["served"] == "own"]
    assert own and max(abs(x - y) for a, p in own for x, y in zip(a["box"], p["box"])) <= 0.02
    index = json.loads((bank[0] / BANK_INDEX).read_text())
    assert len(own) >= index["split"]["covered"] * len(deployed) - 1e-9  # the bank was written for these


def test_route_own_then_the_smallest_superset_then_dense(bank):
    deployment = Deployment(bank[0])
    index, width = deployment.index, deployment.index["layer_gates"] + deployment.index["filter_gates"]
    layers = index["layer_gates"]
    first = _bits(index["subnets"][0]["pattern"], width)
    fewer = first.copy()
    fewer[np.flatnonzero(first)[-1]] = False  # one open filter less: every banked superset of it serves it
    everything = np.ones(width, dtype=bool)
    gates = np.stack([first, fewer, everything]).astype(np.float32)
    routes = deployment.route(gates[:, :layers], gates[:, layers:])
    assert routes[0] == (index["subnets"][0]["file"], "own")
    banked = [s for s in index["subnets"] if np.array_equal(fewer, _bits(s["pattern"], width))]
    supersets = [s for s in index["subnets"] if not np.any(fewer & ~_bits(s["pattern"], width))]
    assert routes[1] == ((banked[0]["file"], "own") if banked else
                         (min(supersets, key=lambda s: s["flops"])["file"], "superset"))
    banked_all_open = any(_bits(s["pattern"], width).all() for s in index["subnets"])
    assert routes[2][1] == ("superset" if banked_all_open else "dense")


def test_runtime_tokens_equal_the_models(bank, model):
    deployment = Deployment(bank[0])
    expressions = ["the red circle", "The LEFTMOST blue square, next to the tiny green star",
                   " ".join(["word"] * 60)]
    ids, mask = deployment.tokens(expressions)
    with pytest.warns(UserWarning, match="truncated"):
        expected = tokenize(model.tokenizer, expressions, model.config.text.max_tokens)
    assert np.array_equal(ids, expected["input_ids"].numpy())
    assert np.array_equal(mask, expected["attention_mask"].numpy())
    with pytest.raises(LadsError, match="is empty"):
        deployment.tokens(["  "])


def test_a_folder_without_a_bank_is_one_clear_error(tmp_path):
    with pytest.raises(LadsError, match="no bank.json; write a bank with lads export --bank"):
        Deployment(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--bank"], "--bank needs --data DIR"),
    (["--bank", "--data", "{data}", "--coverage", "1.5"], "--coverage must be above 0 and at most 1"),
    (["--bank", "--data", "{data}", "--format", "torchscript"], "--bank writes ONNX files"),
])
def test_cli_bad_bank_arguments_are_one_line(trained, synth_data, args, message):
    result = lads_cli("export", "--checkpoint", trained[0], *(a.format(data=synth_data) for a in args))
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_export_bank_refuses_no_expressions_and_a_folder_that_is_not_a_bank(model, tmp_path):
    from lads.export import export_bank

    with pytest.raises(LadsError, match="no expressions"):
        export_bank(model, [], tmp_path / "bank")
    assert not (tmp_path / "bank").exists()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "1.jpg").write_bytes(b"mine")
    with pytest.raises(LadsError, match="exists and is not a bank"):
        export_bank(model, ["the red circle"], tmp_path / "photos")
    assert (tmp_path / "photos" / "1.jpg").read_bytes() == b"mine"


def test_benchmark_runs_small(trained, synth_data, tmp_path):
    """benchmarks/deploy_bank.py on the val split, one pass: accuracy of both, how each
    expression was served, sizes."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "deploy_bank.py"), "--checkpoint", str(trained[0]),
                           "--data", synth_data, "--split", "val", "--coverage", "0.6", "--repeats", "1",
                           "--threads", "1", "--out", str(tmp_path)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "deploy_bank.json").read_text())
    assert abs(sum(s["share"] for s in result["served"].values()) - 1) < 1e-3
    assert result["served"]["own"]["share"] >= 0.6 - 1e-3  # the bank holds val's own patterns
    assert 0 < result["size_mib"]["dense_export"] and set(result["prec@0.5"]) == {"pytorch", "deployed"}
