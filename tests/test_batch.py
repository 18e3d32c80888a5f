"""Batch prediction (``lads.batch``, ``lads predict --input``): the answers of one-image
``predict``, in input order, whatever the batch and the workers; bad lines and images reported
in the output; a file left by a killed run resumed; a subnet serves every expression of its
pattern, across images, and what subnets share runs once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import queries_by_image
from test_predict import ENV, lads_cli

from lads import LADS
from lads.batch import FolderQueries, JsonlQueries, predict_many, predict_to_file
from lads.errors import LadsError
from lads.inference import SubnetRunner
from lads.models.subnet import extract_subnet, random_gates, shared_backbones


@pytest.fixture(scope="module")
def model(trained):
    return LADS.from_pretrained(trained[0])


@pytest.fixture(scope="module")
def queries(synth_data):
    return queries_by_image(synth_data, None)


def boxes(answers) -> np.ndarray:
    return np.array([a["box"] for a in answers])


@pytest.mark.parametrize("batch_size, workers", [(1, 0), (5, 2), (64, 0)])
def test_predict_many_answers_as_predict_does_in_input_order(model, queries, batch_size, workers):
    """Batches that cut images apart, two image-reading workers, one batch for all: the same
    boxes and subnets as ``model.predict`` image by image, numbered by line and index."""
    expected = [p for image, expressions in queries for p in model.predict(image, expressions)]
    answers = list(predict_many(model, queries, batch_size=batch_size, num_workers=workers))
    assert [(a["line"], a["index"]) for a in answers] == \
        [(n, j) for n, (_, expressions) in enumerate(queries) for j in range(len(expressions))]
    assert [a["image"] for a in answers] == [image for image, expressions in queries for _ in expressions]
    assert np.abs(boxes(answers) - boxes(expected)).max() <= 0.02
    assert [a["summary"] for a in answers] == [p["summary"] for p in expected]
    assert [a["flops"] for a in answers] == [p["flops"] for p in expected]


def test_a_stream_and_pil_images_are_queries_too(model, queries):
    """A generator (read in this process) of dicts with PIL images: the same boxes; an
    in-memory image has no name."""
    from PIL import Image

    stream = ({"image": Image.open(image), "expressions": expressions} for image, expressions in queries[:3])
    answers = list(predict_many(model, stream, num_workers=2))
    expected = [p for image, expressions in queries[:3] for p in model.predict(image, expressions)]
    assert np.abs(boxes(answers) - boxes(expected)).max() <= 0.02
    assert {a["image"] for a in answers} == {None}


def test_runner_groups_by_pattern_across_images_and_matches_the_masked_supernet(model):
    """Rows on three images with two gate patterns (gates from two real expressions): one
    forward per pattern, whatever the image, and the masked supernet's boxes."""
    runner = SubnetRunner(model, cache_mb=0)
    tokens = model.tokenizer(["the red circle", "the leftmost blue square"] * 3, padding=True, return_tensors="pt")
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pixel_mask = torch.zeros(3, 64, 64, dtype=torch.bool)
    pixel_mask[2, :, 48:] = True
    image_index = torch.tensor([0, 0, 1, 1, 2, 2])
    result = runner(images, pixel_mask, tokens["input_ids"], tokens["attention_mask"], image_index=image_index)
    masked = runner(images[image_index], pixel_mask[image_index], tokens["input_ids"], tokens["attention_mask"],
                    mode="masked")
    assert torch.allclose(result["boxes"], masked["boxes"], atol=1e-5)
    patterns = {tuple(torch.cat((result["gates"].layer[i], result["gates"].filter[i])).tolist()) for i in range(6)}
    assert len(result["groups"]) == len(patterns)
    assert sorted(i for group in result["groups"] for i in group) == list(range(6))


def test_shared_backbones_equal_each_subnet_alone(model):
    """Patterns that agree on their first bottlenecks and part ways later (and one with a
    closed first layer): the prefix tree gives each subnet its own backbone's features."""
    layout = model.layout
    base = random_gates(layout, 0.7, generator=torch.Generator().manual_seed(1))
    variants = []
    for seed, cut in ((2, 3), (3, 6), (4, 0)):
        g = random_gates(layout, 0.7, generator=torch.Generator().manual_seed(seed))
        keep = sum(s.stop - s.start for s in layout.filter_slices[:cut])
        g.filter[:, :keep] = base.filter[:, :keep]
        g.layer[:, : min(cut, layout.num_layer_gates)] = base.layer[:, : min(cut, layout.num_layer_gates)]
        variants.append(g)
    subnets = [extract_subnet(model, g) for g in (base, *variants)]
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    used = [torch.tensor([0, 1, 3]), torch.tensor([1, 2]), torch.tensor([0, 1, 2, 3]), torch.tensor([2])]
    with torch.inference_mode():
        shared = shared_backbones(subnets, images, used)
        for subnet, u, features in zip(subnets, used, shared):
            assert torch.allclose(features, subnet.backbone(images[u]), atol=1e-5)


def write_queries(folder: Path, queries) -> Path:
    """A JSON-lines file: the first image by a path relative to the file, then a line that is
    not JSON, a missing image and an empty expression list, the other images, and an
    expression given alone."""
    shutil.copy(queries[0][0], folder / "first.png")
    lines = [json.dumps({"image": image, "expressions": expressions})
             for image, expressions in [("first.png", queries[0][1]), *queries[1:]]]
    lines[1:1] = ['{"image": "a.png", "expressions": [', json.dumps({"image": "missing.png", "expressions": ["x"]}),
                  json.dumps({"image": queries[0][0], "expressions": []})]
    lines.append(json.dumps({"image": queries[0][0], "expressions": "the red circle"}))
    path = folder / "queries.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_jsonl_reports_bad_lines_and_a_killed_run_resumes(trained, queries, tmp_path):
    """lads predict --input FILE --out FILE: one answer per expression, one error per bad line
    or image, in input order; the same file cut inside a line (a killed run) is completed by a
    rerun to the same answers, and a rerun of a complete file adds nothing."""
    source = write_queries(tmp_path, queries)
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    done = lads_cli("predict", "--checkpoint", trained[0], "--input", source, "--out", full, "--batch-size", "4")
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in full.read_text().splitlines()]
    errors = [a for a in answers if "error" in a]
    assert [(a["line"], a["error"].split(" (")[0]) for a in errors] == \
        [(1, "not JSON"), (2, "image not found"), (3, '"expressions" must be a non-empty list of strings')]
    n = sum(len(e) for _, e in queries) + 1
    assert len(answers) == n + 3 and f"{n} answers, 3 errors written" in done.stderr
    assert answers[-1]["expression"] == "the red circle" and answers[-1]["line"] == len(queries) + 3
    text = full.read_text()
    cut.write_text(text[: len(text) * 2 // 3 - 5])  # inside a line
    resumed = lads_cli("predict", "--checkpoint", trained[0], "--input", source, "--out", cut, "--batch-size", "4")
    assert resumed.returncode == 0, resumed.stderr
    strip = [{k: v for k, v in a.items() if k != "cache_hit"} for a in answers]
    assert [{k: v for k, v in json.loads(line).items() if k != "cache_hit"} for line in cut.read_text().splitlines()] \
        == strip
    again = lads_cli("predict", "--checkpoint", trained[0], "--input", source, "--out", full)
    assert again.returncode == 0 and "0 answers, 0 errors written" in again.stderr
    assert full.read_text() == text


def test_answers_for_another_input_are_refused(model, queries, tmp_path):
    out = tmp_path / "answers.jsonl"
    predict_to_file(model, queries[:2], out, progress=False)
    with pytest.raises(LadsError, match="written for another input"):
        predict_to_file(model, queries[1:3], out, progress=False)


def test_cli_folder_with_expressions(trained, queries, tmp_path):
    """--input DIR --expr …: every image of the folder (sorted), each with every expression;
    a file that is not an image is left out, an unreadable image is an error line."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (image, _) in enumerate(queries[:3]):
        (folder / f"{i}.png").write_bytes(Path(image).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "3.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "answers.jsonl"
    done = lads_cli("predict", "--checkpoint", trained[0], "--input", folder, "--expr", "the red circle",
                    "--expr", "the small star", "--out", out)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(Path(a["image"]).name, a.get("expression")) for a in answers] == \
        [(f"{i}.png", e) for i in range(3) for e in ("the red circle", "the small star")] + [("3.jpg", None)]
    assert answers[-1]["error"].startswith("unreadable image")
    assert len(FolderQueries(folder, ["x"])) == 4


@pytest.mark.parametrize("args, message", [
    (["--input", "{data}", "--expr", "x"], "--out FILE.jsonl"),
    (["--input", "{missing}", "--out", "a.jsonl"], "no such file"),
    (["--input", "{empty}", "--out", "a.jsonl"], "needs --expr"),
    (["--input", "{jsonl}", "--expr", "x", "--out", "a.jsonl"], "a JSON-lines --input names its expressions"),
    (["--input", "{jsonl}", "--out", "a.jsonl", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--image", "{jsonl}"], "--image needs at least one --expr"),
])
def test_cli_bad_batch_arguments_are_one_line(trained, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("")
    fill = {"data": tmp_path, "missing": tmp_path / "none.jsonl", "empty": tmp_path / "empty", "jsonl": jsonl}
    result = lads_cli("predict", "--checkpoint", trained[0], *(a.format(**fill) for a in args))
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_empty_input_writes_nothing(model, tmp_path):
    (tmp_path / "q.jsonl").write_text("")
    counts = predict_to_file(model, JsonlQueries(tmp_path / "q.jsonl"), tmp_path / "a.jsonl", progress=False)
    assert counts == {"answers": 0, "errors": 0, "skipped": 0}
    assert (tmp_path / "a.jsonl").read_text() == ""


def test_benchmark_runs_small(trained, synth_data, tmp_path):
    """benchmarks/batch_predict.py on 12 expressions, one round: its table and figures."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "batch_predict.py"),
                           "--checkpoint", str(trained[0]),
                           "--data", synth_data, "--split", "train", "--expressions", "12", "--repeats", "1",
                           "--out", str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "batch_predict.json").read_text())
    assert result["expressions"] == 12 and result["max_box_difference_px"] <= 0.02
    assert set(result["ratio"]) == {"predict_many / per expression", "predict_many / per image"}
