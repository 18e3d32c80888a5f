"""``predict`` and the commands on real image files, and the messages for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from lads.errors import LadsError
from lads.models import LADS

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def lads_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lads.cli", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model(trained):
    return LADS.from_pretrained(trained[0])


@pytest.fixture(scope="module")
def photos(tmp_path_factory, synth_data):
    """One synthetic scene saved as JPEG, PNG with alpha, grayscale PNG, and an EXIF-rotated JPEG
    (stored sideways, with orientation 6: a viewer shows it upright)."""
    from lads.datasets import load_records

    out = tmp_path_factory.mktemp("photos")
    record = load_records(synth_data, "test")[0][0]
    scene = Image.open(record.image).convert("RGB")
    scene.save(out / "scene.jpg", quality=95)
    rgba = scene.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(out / "alpha.png")
    scene.convert("L").save(out / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    scene.transpose(Image.Transpose.ROTATE_90).save(out / "rotated.jpg", exif=exif, quality=95)
    return out, scene.size, record.expression


@pytest.mark.parametrize("name", ["scene.jpg", "alpha.png", "gray.png", "rotated.jpg"])
def test_predict_on_image_files_gives_boxes_inside_the_image(model, photos, name):
    folder, (width, height), expression = photos
    predictions = model.predict(folder / name, [expression, "the leftmost object"])
    assert [p["expression"] for p in predictions] == [expression, "the leftmost object"]
    for p in predictions:  # the rotated file is shown upright: same size as the scene
        x1, y1, x2, y2 = p["box"]
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height, p
        assert "bottlenecks" in p["summary"]


def test_modes_agree(model, photos):
    """Extracted subnets, the masked supernet: the same boxes."""
    folder, _, expression = photos
    subnet = model.predict(folder / "scene.jpg", [expression], mode="subnet")[0]["box"]
    masked = model.predict(folder / "scene.jpg", [expression], mode="masked")[0]["box"]
    assert subnet == pytest.approx(masked, abs=0.05)


def test_predict_bad_input(model, photos, tmp_path):
    folder, _, _ = photos
    with pytest.raises(LadsError, match="empty"):
        model.predict(folder / "scene.jpg", ["  "])
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    with pytest.raises(LadsError, match="notes.jpg"):
        model.predict(not_an_image, ["the star"])
    long = " ".join(["the red circle"] * 30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.predict(folder / "scene.jpg", [long])
    assert any("truncated" in str(w.message) for w in caught)


def test_predict_command_writes_json_and_a_picture(trained, photos, tmp_path):
    folder, _, expression = photos
    out = tmp_path / "boxes.png"
    result = lads_cli("predict", "--checkpoint", trained[0], "--image", folder / "scene.jpg",
                      "--expr", expression, "--expr", "the rightmost object", "--out", out)
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)
    assert len(predictions) == 2 and all(len(p["box"]) == 4 for p in predictions)
    assert "filters" in result.stderr  # the one-line subnet summaries
    assert Image.open(out).size[0] > 0


def test_eval_command_table(trained, synth_data, tmp_path):
    result = lads_cli("eval", "--checkpoint", trained[0], "--data", synth_data, "--splits", "test", "heldout",
                      "--out", tmp_path / "table")
    assert result.returncode == 0, result.stderr
    assert "| Method | test | heldout |" in result.stdout
    rows = json.loads((tmp_path / "table.json").read_text())
    assert rows[0]["splits"]["test"]["expressions"] > 0 and "CPU" in rows[0]["device"]


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "tiny", "--set", "train.epoch=3"], "unknown key"),
    (["train", "--config", "tiny", "--set", "train.epochs=many"], "expected int"),
    (["train", "--config", "nope"], "known presets"),
    (["train", "--config", "tiny", "--data", "{empty}"], "{empty}"),
    (["eval", "--checkpoint", "{missing}"], "no such folder"),
    (["predict", "--checkpoint", "{empty}", "--image", "x.jpg", "--expr", "a"], "meta.json"),
])
def test_commands_refuse_bad_input_in_one_line(tmp_path, args, message):
    empty, missing = tmp_path / "empty", tmp_path / "missing"
    empty.mkdir()
    args = [a.format(empty=empty, missing=missing) for a in args]
    result = lads_cli(*args)
    assert result.returncode == 2, result.stderr
    assert message.format(empty=empty) in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
