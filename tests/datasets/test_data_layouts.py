"""Images found where the toolkits put them, and ``lads data check`` against published counts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import coco_name, refer_toolkit, save_image
from helpers import engine_overrides

from lads.cli import main
from lads.datasets import load_records, read_dataset
from lads.datasets.check import PUBLISHED, check, dataset_key


def test_refer_toolkit_layout_is_found_and_named(tmp_path, capsys):
    folder = refer_toolkit(tmp_path)
    contents = read_dataset(folder, ["train"])
    train2014 = tmp_path / "data" / "images" / "mscoco" / "images" / "train2014"
    assert contents.image_root.path == train2014 and "REFER toolkit" in contents.image_root.how
    assert all(r.image.startswith(str(train2014)) for r in contents.records)
    assert main(["data", "stats", str(folder)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split() for line in out.splitlines()[1:5]}
    assert rows["train"][-1] == "0" and rows["val"][-1] == "0"  # no image missing
    assert f"images in {train2014} (found: REFER toolkit layout)" in out


def test_given_image_root_wins_and_no_layout_is_a_clear_note(tmp_path, capsys):
    folder = refer_toolkit(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "data" / "images" / "mscoco" / "images" / "train2014", elsewhere)
    records, _ = load_records(folder, "val", image_root=elsewhere)
    assert records[0].image == str(elsewhere / coco_name(3))
    shutil.rmtree(tmp_path / "data" / "images")
    main(["data", "stats", str(folder), "--split", "val"])
    out = capsys.readouterr().out
    assert f"images in {folder / 'images'} (default; {coco_name(3)} is in none of" in out
    assert "1 image file(s) missing" in out


def test_transvg_layout_is_found(tmp_path):
    """TransVG: split files in ``data/unc/``, images in ``ln_data/other/images/mscoco/images/train2014``."""
    split_dir = tmp_path / "data" / "unc"
    split_dir.mkdir(parents=True)
    torch.save([(coco_name(1), "mask.pth", [2, 2, 30, 20], "the thing")], split_dir / "unc_val.pth")
    save_image(tmp_path / "ln_data" / "other" / "images" / "mscoco" / "images" / "train2014" / coco_name(1), (64, 48))
    contents = read_dataset(split_dir, ["val"])
    assert "TransVG layout" in contents.image_root.how
    assert contents.records[0].image == str(tmp_path / "ln_data/other/images/mscoco/images/train2014" / coco_name(1))


def test_lads_train_finds_the_images_of_the_refer_layout(tmp_path, tiny_text_dir, capsys):
    folder = refer_toolkit(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--config", "tiny"]
    for o in [*engine_overrides(tiny_text_dir, str(folder), out), "train.batch_size=2", "train.micro_batch=2",
              "train.max_steps=1", "data.eval_splits=[\"val\"]", "model.visual.pretrained=null"]:
        args += ["--set", o]
    assert main(args) == 0
    assert "(found: REFER toolkit layout)" in capsys.readouterr().out
    assert (out / "checkpoint").is_dir()


# ----------------------------------------------------------------------------- lads data check


def write_expected(tmp_path):
    """The counts of ``refer_toolkit``'s default copy, as ``--expect`` takes them."""
    expect = tmp_path / "expect.json"
    expect.write_text(json.dumps({"train": {"expressions": 4, "objects": 2, "images": 2},
                                  "val": {"expressions": 2, "objects": 1, "images": 1},
                                  "testA": {"expressions": 2, "objects": 1, "images": 1},
                                  "testB": {"expressions": 2, "objects": 1, "images": 1}}))
    return expect


def test_check_passes_a_complete_copy(tmp_path, capsys):
    folder = refer_toolkit(tmp_path)
    expect = write_expected(tmp_path)
    assert main(["data", "check", str(folder), "--expect", str(expect)]) == 0
    out = capsys.readouterr().out
    assert "train: expressions 4 / 4, objects 2 / 2, images 2 / 2 (found / expected): ok" in out
    assert "every count as expected, every image present" in out


def test_check_names_a_short_split_and_a_missing_image(tmp_path, capsys):
    # one train ref short
    folder = refer_toolkit(tmp_path, splits=(("train", 1), ("val", 3), ("testA", 4), ("testB", 5)))
    (tmp_path / "data/images/mscoco/images/train2014" / coco_name(4)).unlink()
    expect = write_expected(tmp_path)
    assert main(["data", "check", str(folder), "--expect", str(expect)]) == 1
    out = capsys.readouterr().out
    assert "train: expressions 2 / 4, objects 1 / 2, images 1 / 2" in out
    assert "(found / expected): differs in expressions, objects, images" in out
    assert "testA: " in out and "1 image file(s) missing" in out
    train2014 = tmp_path / "data/images/mscoco/images/train2014"
    assert f"missing images: 1 of 4 in {train2014} (first: {coco_name(4)})" in out
    assert out.rstrip().splitlines()[-1].startswith("mismatch: ")


def test_check_uses_the_published_counts_of_refcoco(tmp_path, capsys):
    folder = refer_toolkit(tmp_path)
    assert dataset_key(folder) == "refcoco/unc"
    report = check(folder)
    assert report.dataset == "refcoco/unc" and not report.ok
    train = next(s for s in report.splits if s.split == "train")
    assert train.expected == {"expressions": 120624, "objects": 42404, "images": 16994}
    assert main(["data", "check", str(folder), "--no-image-check"]) == 1
    assert "train: expressions 4 / 120,624, objects 2 / 42,404" in capsys.readouterr().out


@pytest.mark.parametrize("dataset, totals", [
    ("refcoco/unc", (142210, 50000, 19994)),  # Yu et al. 2016, Table 1; REFER's README
    ("refcoco+/unc", (141564, 49856, 19992)),
    ("refcocog/umd", (95010, 49822, 25799)),  # Nagaraja et al. 2016
])
def test_published_splits_add_up_to_the_published_totals(dataset, totals):
    sums = tuple(sum(counts[k] for counts in PUBLISHED[dataset].values()) for k in range(3))
    assert sums == totals


def test_check_refuses_a_bad_expect_file(tmp_path, capsys):
    folder = refer_toolkit(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"sentences": 3}}))
    assert main(["data", "check", str(folder), "--expect", str(bad)]) == 2
    assert f"--expect {bad}: expected {{split: {{expressions, objects, images: integer}}}}" in capsys.readouterr().err
