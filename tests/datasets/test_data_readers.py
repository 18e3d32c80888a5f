"""Readers: REFER (Python-2 pickles), TransVG split files, JSONL; format detection."""

from __future__ import annotations

import json
import pickle
import pickletools
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from lads.datasets import known_splits, load_records
from lads.errors import LadsError


def test_py2_pickle_fixture_is_python2_style(py2_pickle):
    data = py2_pickle({"sent": "left", "n": [1, 300, 70000, 0.5, None]})
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    assert "SHORT_BINSTRING" in ops and not ops & {"GLOBAL", "STACK_GLOBAL", "BINUNICODE"}
    assert pickle.loads(data, encoding="bytes") == {b"sent": b"left", b"n": [1, 300, 70000, 0.5, None]}


def test_refer_counts_boxes_and_fields(refer_dir):
    per_split = {s: load_records(refer_dir, s) for s in known_splits(refer_dir)}
    assert list(per_split) == ["train", "val", "testA", "testB"]
    assert {s: len(r) for s, (r, _) in per_split.items()} == {"train": 3, "val": 1, "testA": 1, "testB": 1}
    assert per_split["train"][1] == Counter()
    assert per_split["val"][1] == Counter({"empty expression": 1})
    assert per_split["testB"][1] == Counter({"box with zero or negative size": 1, "box outside image": 1})

    train = per_split["train"][0]
    assert [r.expression for r in train] == ["the left cup", "café au lait", "the right cup"]
    first = train[0]
    assert first.box == (4.0, 6.0, 24.0, 16.0)  # xywh -> xyxy
    assert (first.dataset, first.split, first.ref_id, first.ann_id, first.image_id, first.sent_id) == (
        "refcoco", "train", 1, 10, 1, 100)
    assert first.image == str(refer_dir / "images" / "COCO_train2014_000000000001.jpg")
    assert (first.expr_type, train[2].expr_type) == (None, "spatial")
    assert train[2].box == (30.0, 8.0, 63.0, 47.5)
    assert per_split["testA"][0][0].box == (62.0, 46.0, 64.0, 48.0)  # clipped


def test_refer_split_by_image_root_and_all_splits(refer_dir, tmp_path):
    records, _ = load_records(refer_dir, "train", split_by="google", image_root=tmp_path / "coco")
    assert len(records) == 3 and records[0].image == str(tmp_path / "coco" / "COCO_train2014_000000000001.jpg")
    assert len(load_records(refer_dir / "refs(google).p", None)[0]) == 3
    everything, skipped = load_records(refer_dir, None)
    assert len(everything) == 6 and sum(skipped.values()) == 3
    with pytest.raises(LadsError, match=r"refs\(umd\)\.p.*google, unc|refs\(umd\)\.p.*unc, google"):
        load_records(refer_dir, "train", split_by="umd")


def test_refer_strict_names_file_and_record(refer_dir):
    with pytest.raises(LadsError, match=r"refs\(unc\)\.p ref 3 sentence 104: empty expression"):
        load_records(refer_dir, "val", strict=True)
    with pytest.raises(LadsError, match=r"ref 5 sentence 106: box with zero or negative size"):
        load_records(refer_dir, "testB", strict=True)


def test_unknown_split_lists_known_ones(refer_dir):
    with pytest.raises(LadsError, match=r"no split 'test'.*train, val, testA, testB"):
        load_records(refer_dir, "test")


def test_no_dataset_or_missing_parts(tmp_path, refer_dir):
    with pytest.raises(LadsError, match="no dataset found"):
        load_records(tmp_path, "train")
    with pytest.raises(LadsError, match="no such file"):
        load_records(tmp_path / "nothing", "train")
    (refer_dir / "instances.json").unlink()
    with pytest.raises(LadsError, match=r"instances\.json: missing"):
        load_records(refer_dir, "train")
    (refer_dir / "refs(unc).p").write_bytes(b"\x80\x02]q\x00(K\x01")  # cut short
    with pytest.raises(LadsError, match=r"refs\(unc\)\.p: not a readable pickle"):
        load_records(refer_dir, "train")


def write_transvg(folder, ds, split, items):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(items, folder / f"{ds}_{split}.pth")
    return folder / f"{ds}_{split}.pth"


def test_transvg_xywh_and_referit_xyxy(tmp_path):
    unc = tmp_path / "unc"
    write_transvg(unc, "unc", "train", [
        ("COCO_train2014_000000000001.jpg", "COCO_1_10.npy", [4, 6, 20, 10], "the left cup", []),
        ("COCO_train2014_000000000002.jpg", "COCO_2_11.npy", [0, 0, 0, 10], "flat", []),
    ])
    write_transvg(unc, "unc", "testA", [("a.jpg", None, [1.0, 2.0, 3.0, 4.0], "x", [])])
    assert known_splits(unc) == ["train", "testA"]
    records, skipped = load_records(unc, "train", image_root=tmp_path / "train2014")
    assert [r.box for r in records] == [(4.0, 6.0, 24.0, 16.0)]
    assert skipped == Counter({"box with zero or negative size": 1})
    assert records[0].image == str(tmp_path / "train2014" / "COCO_train2014_000000000001.jpg")
    assert (records[0].dataset, records[0].split, records[0].expression) == ("unc", "train", "the left cup")

    referit = write_transvg(tmp_path / "referit", "referit", "test", [
        ("8756.jpg", 8756, [10, 20, 30, 60], "sky"), ("1.jpg", 1, [5, 5, 40, 40], "tree")])
    records, _ = load_records(referit, "test")
    assert [r.box for r in records] == [(10.0, 20.0, 30.0, 60.0), (5.0, 5.0, 40.0, 40.0)]
    assert records[0].image == str(tmp_path / "referit" / "images" / "8756.jpg")
    with pytest.raises(LadsError, match=r"no split 'val'.*has test"):
        load_records(referit, "val")


def test_transvg_refuses_unsafe_or_unknown(tmp_path):
    write_transvg(tmp_path / "copsref", "copsref", "test", [("a.jpg", [1, 2, 3, 4], "x")])
    with pytest.raises(LadsError, match="unknown TransVG dataset 'copsref'"):
        load_records(tmp_path / "copsref", "test")
    bad = tmp_path / "unc" / "unc_val.pth"
    bad.parent.mkdir()
    torch.save([("a.jpg", None, [1, 2, 3, 4], "x", Fraction(1, 2))], bad)  # a class inside
    with pytest.raises(LadsError, match=r"unc_val\.pth: not a readable TransVG split file"):
        load_records(bad, "val")


def test_jsonl_formats_paths_and_bad_lines(tmp_path):
    lines = [
        {"image": "imgs/a.jpg", "expression": "the red cup", "box": [1, 2, 11, 22]},
        {"image": "/abs/b.jpg", "expression": "a dog", "box": [1, 2, 10, 20], "box_format": "xywh",
         "split": "train", "id": 7},
        {"image": "c.jpg", "expression": "", "box": [1, 2, 3, 4]},
        {"image": "d.jpg", "expression": "no box"},
        {"image": "e.jpg", "expression": "bad box", "box": [1, 2, 3]},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join([json.dumps(x) for x in lines] + ["", "{not json"]) + "\n")
    assert known_splits(path) == ["train", "test"]
    test, skipped = load_records(path, "test")
    assert [(r.image, r.box, r.split, r.dataset) for r in test] == [
        (str(tmp_path / "imgs" / "a.jpg"), (1.0, 2.0, 11.0, 22.0), "test", "mine")]
    assert skipped == Counter({"empty expression": 1, "missing field": 1,
                               "box must be four numbers": 1, "not valid JSON": 1})
    train, _ = load_records(path, "train")
    assert [(r.image, r.box, r.sent_id) for r in train] == [("/abs/b.jpg", (1.0, 2.0, 11.0, 22.0), 7)]
    with pytest.raises(LadsError, match=r"mine\.jsonl:3: empty expression"):
        load_records(path, "test", strict=True)


def test_jsonl_with_nothing_usable(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.jpg", "expression": "x", "box": [5, 5, 1, 1]}\n')
    with pytest.raises(LadsError, match=r"bad\.jsonl: no usable records; e\.g\. .*bad\.jsonl:1"):
        load_records(path, "test")


def test_jsonl_example_in_docs_reads(tmp_path):
    docs = Path(__file__).parents[2] / "docs" / "data.md"
    example = re.search(r"## JSONL.*?```json\n(.*?)```", docs.read_text(), re.S).group(1)
    (tmp_path / "my.jsonl").write_text(example)
    assert known_splits(tmp_path / "my.jsonl") == ["train", "val", "test"]
    train, skipped = load_records(tmp_path / "my.jsonl", "train")
    assert train[0].box == (230.0, 60.0, 340.0, 210.0) and skipped == Counter()


def test_refer_malformed_refs_are_counted(refer_dir, py2_pickle):
    refs = [
        {"ref_id": 1, "ann_id": 10, "image_id": 1, "split": "train", "sentences": [{"sent": "ok", "sent_id": 1}]},
        {"ref_id": 2, "ann_id": 99, "image_id": 1, "split": "train", "sentences": [{"sent": "x"}]},
        {"ref_id": 3, "ann_id": 10, "image_id": 1, "split": "train"},
    ]
    (refer_dir / "refs(unc).p").write_bytes(py2_pickle(refs))
    records, skipped = load_records(refer_dir, "train")
    assert [r.expression for r in records] == ["ok"]
    assert skipped == Counter({"annotation missing from instances.json": 1, "malformed ref": 1})
    with pytest.raises(LadsError, match=r"refs\(unc\)\.p ref 2: annotation missing"):
        load_records(refer_dir, "train", strict=True)
