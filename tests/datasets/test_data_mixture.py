"""Record tables (compact, memory-mapped) and pre-training mixtures: weights, determinism, exact
resume of the epoch order, leak-free exclusion of evaluation images; on real files."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import coco_name, save_image, sentence, write_py2_pickle

from lads.config import EvalSet, MixtureSource, load_config
from lads.datasets import load_records, read_dataset
from lads.datasets.mixture import build_table, load_mixture, table_folder
from lads.datasets.records import Record
from lads.datasets.table import RecordTable, TableBuilder
from lads.engine import EpochPlan, SeededSamples, rank_micro_batches
from lads.errors import LadsError


@pytest.fixture
def sources(tmp_path):
    """Three datasets on disk. ``refcoco`` (REFER): train on COCO images 1 and 2, val on 3,
    testA on 4. ``vg`` (Visual Genome): regions on images with coco_id 3 (a val image), 1 (a
    train image) and none. ``mine.jsonl``: 6 expressions, one on COCO image 4 (testA)."""
    refcoco = tmp_path / "refcoco"
    refcoco.mkdir()
    refs = [{"ref_id": i, "ann_id": 10 + i, "image_id": image, "split": split, "category_id": 1,
             "sentences": [sentence(100 + i, f"thing {i}")]}
            for i, (image, split) in enumerate([(1, "train"), (1, "train"), (2, "train"), (3, "val"), (4, "testA")])]
    (refcoco / "refs(unc).p").write_bytes(write_py2_pickle(refs))
    images = [{"id": i, "file_name": coco_name(i), "width": 64, "height": 48} for i in (1, 2, 3, 4)]
    anns = [{"id": 10 + r["ref_id"], "image_id": r["image_id"], "bbox": [2, 2, 20, 20], "category_id": 1} for r in refs]
    (refcoco / "instances.json").write_text(json.dumps({"images": images, "annotations": anns}))
    for image in images:
        save_image(refcoco / "images" / image["file_name"], (64, 48))

    vg = tmp_path / "vg"
    vg.mkdir()
    vg_images = [{"image_id": 7, "url": "http://x/VG_100K/7.jpg", "width": 64, "height": 48, "coco_id": 3},
                 {"image_id": 8, "url": "http://x/VG_100K_2/8.jpg", "width": 64, "height": 48, "coco_id": 1},
                 {"image_id": 9, "url": "http://x/VG_100K/9.jpg", "width": 64, "height": 48, "coco_id": None}]
    regions = [{"id": im["image_id"], "regions": [
        {"region_id": 100 * im["image_id"] + j, "image_id": im["image_id"], "phrase": f"region {j} of {im['image_id']}",
         "x": 1 + j, "y": 1, "width": 10, "height": 10} for j in range(4)]} for im in vg_images]
    (vg / "image_data.json").write_text(json.dumps(vg_images))
    (vg / "region_descriptions.json").write_text(json.dumps(regions))
    for im in vg_images:
        save_image(vg / im["url"].split("/")[-2] / f"{im['image_id']}.jpg", (64, 48))

    mine = tmp_path / "mine.jsonl"
    names = [coco_name(4)] + [f"photo{i}.png" for i in range(5)]
    mine.write_text("".join(json.dumps({"image": n, "expression": f"my thing {i}", "box": [1, 1, 30, 30],
                                        "split": "train"}) + "\n" for i, n in enumerate(names)))
    for n in names:
        save_image(tmp_path / n, (64, 48))
    return {"refcoco": str(refcoco), "vg": str(vg), "mine": str(mine)}


def data_config(tmp_path, mixture, exclude="unset"):
    overrides = [f"data.mixture={json.dumps(mixture)}", f"data.index_dir={tmp_path / 'index'}"]
    if exclude != "unset":
        overrides.append(f"data.exclude={json.dumps(exclude)}")
    return load_config("tiny", overrides).data


# ----------------------------------------------------------------------------- tables


def test_table_round_trip_memory_mapped_and_pickled(tmp_path):
    records = [
        Record("/d/COCO_train2014_000000000005.jpg", "café au lait", (1.5, 2.25, 30.0, 40.0), "refcoco", "train",
               ref_id=3, ann_id=10, image_id=5, sent_id=7, expr_type="spatial", coco_id=5),
        Record("/d/b.jpg", "a dog", (0.0, 0.0, 8.0, 9.0), "mine", "val"),
        Record("/d/COCO_train2014_000000000005.jpg", "the left one", (2.0, 3.0, 4.0, 5.0), "refcoco", "train",
               image_id=5, coco_id=5),
    ]
    saved = RecordTable.from_records(records, origin="somewhere").save(tmp_path / "table")
    table = RecordTable.open(saved)
    assert isinstance(table.columns["boxes"], np.memmap) and len(table) == 3
    for want, got in zip(records, table):
        assert (got.image, got.expression, got.box, got.dataset, got.split, got.ref_id, got.ann_id, got.image_id,
                got.sent_id, got.expr_type, got.coco_id) == (
            want.image, want.expression, want.box, want.dataset, want.split, want.ref_id, want.ann_id,
            want.image_id, want.sent_id, want.expr_type, want.coco_id)
    assert table[1].source == "somewhere [val] record 1" and table[-1].expression == "the left one"
    assert table.columns["image_bytes"].size == len(b"/d/COCO_train2014_000000000005.jpg/d/b.jpg")  # one path per image
    assert table.rows("train").tolist() == [0, 2] and table.record_coco_ids(np.array([0, 1])).tolist() == [5, -1]
    with pytest.raises(LadsError, match="no split 'test'; this dataset has train, val"):
        table.rows("test")
    with pytest.raises(IndexError):
        table[3]
    assert len(pickle.dumps(table)) < 300  # travels as its folder
    again = pickle.loads(pickle.dumps(table))
    assert isinstance(again.columns["boxes"], np.memmap) and again[0].expression == "café au lait"


def test_table_built_through_the_readers_matches_load_records(refer_dir):
    table = build_table(refer_dir)
    listed, skipped = load_records(refer_dir, None)
    assert [(r.expression, r.box, r.split, r.sent_id) for r in table] == [
        (r.expression, r.box, r.split, r.sent_id) for r in listed]
    assert table.skipped() == skipped and table.meta["splits"] == ["train", "val", "testA", "testB"]
    assert isinstance(read_dataset(refer_dir, ["train"], sink=TableBuilder()).records, TableBuilder)


def test_broken_table_is_a_clear_error(tmp_path):
    folder = RecordTable.from_records([Record("a.jpg", "x", (0, 0, 1, 1), "d", "train")]).save(tmp_path / "t")
    (folder / "boxes.npy").write_bytes(b"not numpy")
    with pytest.raises(LadsError, match=r"/t: not a readable record table"):
        RecordTable.open(folder)


# ----------------------------------------------------------------------------- mixtures


def test_mixture_weights_a_long_draw_matches_them(tmp_path, sources):
    data = data_config(tmp_path, [{"path": sources["refcoco"], "weight": 1}, {"path": sources["vg"], "weight": 2},
                                  {"path": sources["mine"], "weight": 1}], exclude=[])
    mixture = load_mixture(data, say=lambda line: None)
    assert len(mixture) == 3 + 12 + 6 and [len(r) for r in mixture.rows] == [3, 12, 6]
    drawn = Counter()
    for epoch in range(40):
        order = mixture.epoch_order(0, epoch)
        assert len(order) == len(mixture)
        per_epoch = np.bincount(mixture.source_of(order), minlength=3)
        assert per_epoch.sum() == 21 and all(np.floor(s) <= c <= np.ceil(s)
                                             for c, s in zip(per_epoch, [5.25, 10.5, 5.25]))
        assert set(order.tolist()) >= {0, 1, 2}  # refcoco's 3 records fill its 5 draws: each at least once
        drawn.update(mixture.source_of(order).tolist())
    shares = np.array([drawn[k] for k in range(3)]) / (40 * 21)
    np.testing.assert_allclose(shares, [0.25, 0.5, 0.25], atol=0.01)
    u = np.linspace(0, 1, 1000, endpoint=False)  # systematic rounding is exact on average over its offset
    np.testing.assert_allclose(np.mean([mixture.quotas(21, x) for x in u], axis=0), [5.25, 10.5, 5.25])
    assert mixture[0].dataset == "refcoco" and mixture[3].dataset == "visual_genome" and mixture[20].dataset == "mine"


def test_mixture_without_weights_is_a_concatenation_and_half_weights_are_refused(tmp_path, sources):
    data = data_config(tmp_path, [{"path": sources["vg"]}, {"path": sources["mine"]}], exclude=[])
    mixture = load_mixture(data, say=lambda line: None)
    order = mixture.epoch_order(3, 0)
    assert sorted(order.tolist()) == list(range(18))  # every record once, shuffled
    with pytest.raises(LadsError, match="give every source a weight, or none"):
        load_mixture(data_config(tmp_path, [{"path": sources["vg"], "weight": 1}, {"path": sources["mine"]}]),
                     say=lambda line: None)


def test_mixture_order_is_deterministic_and_resumes_exactly(tmp_path, sources):
    data = data_config(tmp_path, [{"path": sources["vg"], "weight": 3}, {"path": sources["mine"], "weight": 1}],
                       exclude=[])
    first, again = (load_mixture(data, say=lambda line: None) for _ in range(2))
    assert np.array_equal(first.epoch_order(5, 2), again.epoch_order(5, 2))
    assert not np.array_equal(first.epoch_order(5, 2), first.epoch_order(5, 3))
    assert not np.array_equal(first.epoch_order(5, 2), first.epoch_order(6, 2))

    class Holder:  # what SeededSamples wraps: a dataset with ``records``
        records = first

        def __len__(self):
            return len(first)

    samples = SeededSamples(Holder(), seed=11)
    order = samples.order(1)
    assert np.array_equal(order, SeededSamples(Holder(), seed=11).order(1))
    # the engine's plan of an epoch started at step 2 is the tail of the whole epoch's plan
    whole = list(EpochPlan(order, 1, range(0, 4), 4, 2, 2, rank=0))
    resumed = list(EpochPlan(order, 1, range(2, 4), 4, 2, 2, rank=0))
    assert len(whole) == 8 and resumed == whole[4:]
    assert whole[0] == [(1, int(i)) for i in rank_micro_batches(order, 4, 0, 2, 2, 0)[0]]


def test_leak_free_by_default_and_counted(tmp_path, sources, capsys):
    mixture = [{"path": sources["refcoco"]}, {"path": sources["vg"]}, {"path": sources["mine"]}]
    leak_free = load_mixture(data_config(tmp_path, mixture))
    # refcoco's val and testA images are COCO 3 and 4: VG image 7 (coco_id 3) and mine's COCO image 4 leave
    assert [r["removed"] for r in leak_free.report] == [0, 4, 1]
    assert [r["expressions"] for r in leak_free.report] == [3, 8, 5]
    kept = {leak_free[i].image_id for i in range(len(leak_free)) if leak_free[i].dataset == "visual_genome"}
    assert kept == {8, 9}  # coco_id 1 is a train image of refcoco: it stays
    assert all(leak_free[i].coco_id not in (3, 4) for i in range(len(leak_free)))
    said = capsys.readouterr().out
    assert "evaluation images (2 COCO ids) of: " in said and "removed 4 of evaluation images" in said

    off = load_mixture(data_config(tmp_path, mixture, exclude=[]), say=lambda line: None)
    assert [r["removed"] for r in off.report] == [0, 0, 0]
    # an evaluation set that is not a source of the mixture still removes its images
    named = load_mixture(data_config(tmp_path, mixture[1:], exclude=[{"path": sources["refcoco"], "split_by": "unc"}]),
                         say=lambda line: None)
    assert [r["removed"] for r in named.report] == [4, 1]


def test_source_tables_are_built_once_and_reused(tmp_path, sources):
    data = data_config(tmp_path, [{"path": sources["vg"]}], exclude=[])
    load_mixture(data, say=lambda line: None)
    folder = table_folder(data.mixture[0], data.index_dir)
    stamp = (folder / "boxes.npy").stat().st_mtime_ns
    load_mixture(data, say=lambda line: None)
    assert (folder / "boxes.npy").stat().st_mtime_ns == stamp
    other = MixtureSource(path=sources["vg"], image_root=str(tmp_path))
    assert table_folder(other, data.index_dir) != folder  # another image root: another table


def test_mixture_config_is_checked(tmp_path, sources):
    with pytest.raises(LadsError, match=r"data\.mixture\[0\]: unknown key\(s\) wieght"):
        load_config("tiny", [f"data.mixture={json.dumps([{'path': 'x', 'wieght': 1}])}"])
    cfg = load_config("tiny", [f"data.mixture={json.dumps([{'path': 'x', 'weight': 2}])}",
                               'data.exclude=[{"path": "y"}]'])
    assert cfg.data.mixture == [MixtureSource(path="x", weight=2.0)] and cfg.data.exclude == [EvalSet(path="y")]
    with pytest.raises(LadsError, match=r"mine\.jsonl: no split 'val'; this dataset has train"):
        load_mixture(data_config(tmp_path, [{"path": sources["mine"], "split": "val"}]), say=lambda line: None)


def test_lads_data_index_builds_the_tables_and_reports(tmp_path, sources):
    mixture = json.dumps([{"path": sources["vg"]}, {"path": sources["mine"]}, {"path": sources["refcoco"]}])
    result = subprocess.run([sys.executable, "-m", "lads.cli", "data", "index", "--set", f"data.mixture={mixture}",
                             "--set", f"data.index_dir={tmp_path / 'index'}"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "mixture of 3 sources, 16 samples an epoch" in result.stdout
    assert f"{sources['vg']} [train]: 8 expressions, share 50.0 %; removed 4 of evaluation images" in result.stdout
    assert len(list((tmp_path / "index").glob("*/table.json"))) == 3
