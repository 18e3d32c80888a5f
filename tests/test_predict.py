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
    long = " ".join(["the red circle"] * 170)  # 510 words
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.predict(folder / "scene.jpg", [long, long, "the star"])
    (warning,) = caught  # one for the call, pointing at the caller's line, the expression abbreviated
    assert "2 expression(s) longer than model.text.max_tokens" in str(warning.message)
    assert warning.filename == __file__ and len(str(warning.message)) < 250


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

    long = " ".join(["the red circle"] * 170)
    result = lads_cli("predict", "--checkpoint", trained[0], "--image", folder / "scene.jpg", "--expr", long)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("lads predict: warning: 1 expression(s) longer")
    assert len(lines[1]) < 200 and "filters" in lines[1]  # the summary abbreviates the expression


def test_drawing_shows_the_true_box_dashed_and_keeps_labels_apart(photos, tmp_path):
    from PIL import ImageDraw

    from lads.analysis.draw import COLOURS, _free_spot, draw

    folder, (width, height), _ = photos
    box, truth = [10.0, 10.0, 40.0, 30.0], [12.0, 40.0, 42.0, 60.0]
    predictions = [{"expression": f"expression {i}", "box": box} for i in range(3)]
    picture = Image.open(draw(folder / "scene.jpg", predictions, tmp_path / "p.png", truths=[truth, None, None]))
    factor = picture.width // width
    red = tuple(int(COLOURS[0][i:i + 2], 16) for i in (1, 3, 5))
    edge = [picture.getpixel((x, int(truth[1] * factor)))
            for x in range(int(truth[0] * factor) + 2, int(truth[2] * factor) - 2)]
    painted = [p[:3] == red for p in edge]
    assert 0.3 < sum(painted) / len(painted) < 0.8  # dashed: painted and gaps along the true box's top edge

    canvas = ImageDraw.Draw(picture)
    placed = []
    for i in range(6):  # six labels for one box: each placed below the others, none covering another
        x, y = _free_spot(canvas, f"{i}: the same box (IoU 0.50)", [v * factor for v in box], placed, picture.size)
        rect = canvas.textbbox((x, y), f"{i}: the same box (IoU 0.50)")
        assert not any(rect[0] < r[2] and r[0] < rect[2] and rect[1] < r[3] and r[1] < rect[3] for r in placed)
        placed.append(rect)


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
