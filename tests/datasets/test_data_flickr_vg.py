"""The pre-training readers: Flickr30k Entities (XML + markup), Visual Genome (JSON), TransVG's
flickr split files; each on real files written here."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import save_image

from lads.datasets import known_splits, load_records
from lads.errors import LadsError

ROOT = Path(__file__).resolve().parents[2]


def voc_xml(width, height, objects) -> str:
    """A Flickr30k Entities annotation: ``objects`` are (entity ids, (xmin, ymin, xmax, ymax) or
    "scene" or "nobox")."""
    parts = [f"<annotation><filename>x.jpg</filename><size><width>{width}</width><height>{height}</height>"
             "<depth>3</depth></size>"]
    for names, box in objects:
        inner = "".join(f"<name>{n}</name>" for n in names)
        if box == "scene":
            inner += "<nobndbox>0</nobndbox><scene>1</scene>"
        elif box == "nobox":
            inner += "<nobndbox>1</nobndbox><scene>0</scene>"
        else:
            inner += ("<bndbox>" + "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
                      + "</bndbox>")
        parts.append(f"<object>{inner}</object>")
    return "".join(parts) + "</annotation>"


FLICKR = {
    # image id: (split, objects, sentences)
    "1001": ("train", [(["11"], (1, 1, 20, 10)), (["12"], (5, 5, 10, 10)), (["12"], (30, 20, 40, 30)),
                       (["13"], "scene"), (["14"], "nobox")],
             ["[/EN#11/people A man] plays with [/EN#12/people two kids] in [/EN#13/scene a park] .",
              "[/EN#11/people Someone] holds [/EN#14/other a thing] near [/EN#0/notvisual it] .",
              "[/EN#11/people A broken phrase near [/EN#12/people kids] .",
              "[/EN#99/other an entity the XML lacks] ."]),
    "1002": ("val", [(["21", "22"], (2, 2, 64, 48))],
             ["[/EN#21/clothing/bodyparts a red hat] and [/EN#22/people its wearer]"]),
    "1003": ("test", [(["31"], (1, 1, 8, 8))], ["[/EN#31/animals A dog]"]),
    "1004": ("test", "<annotation><size><width>64</width>", ["[/EN#41/people A woman] and [/EN#42/people a man]"]),
}


@pytest.fixture
def flickr_dir(tmp_path):
    folder = tmp_path / "flickr30k_entities"
    for sub in ("Annotations", "Sentences"):
        (folder / sub).mkdir(parents=True)
    splits = {}
    for image_id, (split, objects, sentences) in FLICKR.items():
        xml = objects if isinstance(objects, str) else voc_xml(64, 48, objects)
        (folder / "Annotations" / f"{image_id}.xml").write_text(xml)
        (folder / "Sentences" / f"{image_id}.txt").write_text("\n".join(sentences) + "\n")
        save_image(folder / "flickr30k-images" / f"{image_id}.jpg", (64, 48))
        splits.setdefault(split, []).append(image_id)
    for split, ids in splits.items():
        (folder / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return folder


def test_flickr30k_counts_per_split_and_skip_reason(flickr_dir):
    assert known_splits(flickr_dir) == ["train", "val", "test"]
    train, skipped = load_records(flickr_dir, "train")
    assert [r.expression for r in train] == ["A man", "two kids", "Someone"]
    assert skipped == Counter({"scene entity, no box": 1, "entity without a box": 2, "notvisual phrase": 1,
                               "malformed markup": 1})
    val, skipped = load_records(flickr_dir, "val")
    assert [(r.expression, r.expr_type) for r in val] == [("a red hat", "clothing/bodyparts"),
                                                          ("its wearer", "people")]
    assert not skipped
    test, skipped = load_records(flickr_dir, "test")
    assert [r.expression for r in test] == ["A dog"] and skipped == Counter({"unreadable annotation": 2})


def test_flickr30k_boxes_one_based_inclusive_to_pixels_and_union(flickr_dir):
    train, _ = load_records(flickr_dir, "train")
    man, kids = train[0], train[1]
    assert man.box == (0.0, 0.0, 20.0, 10.0)  # pixels 1..20 x 1..10 cover [0, 20) x [0, 10)
    assert kids.box == (4.0, 4.0, 40.0, 30.0)  # the union of the entity's two boxes
    assert (man.image_id, man.ref_id, man.split, man.dataset) == (1001, 11, "train", "flickr30k")
    assert man.image == str(flickr_dir / "flickr30k-images" / "1001.jpg") and Path(man.image).is_file()
    assert man.source.endswith("1001.txt:1 phrase 1")
    # a box given to two entities serves both; its right edge is the image's
    assert {r.box for r in load_records(flickr_dir, "val")[0]} == {(1.0, 1.0, 64.0, 48.0)}


def test_flickr30k_errors_are_counted_or_clear(flickr_dir, tmp_path):
    with pytest.raises(LadsError, match=r"1001\.txt:3: malformed markup"):
        load_records(flickr_dir, "train", strict=True)
    records, _ = load_records(flickr_dir, "train", image_root=tmp_path / "imgs")
    assert records[0].image == str(tmp_path / "imgs" / "1001.jpg")
    (flickr_dir / "Annotations" / "1003.xml").write_text(voc_xml(64, 48, [(["31"], (1, "one", 8, 8))]))
    with pytest.raises(LadsError, match=r"no usable records; e\.g\. \S+1003\.txt:1 phrase 1: malformed annotation"):
        load_records(flickr_dir, "test")  # every phrase of the test split is skipped now
    (flickr_dir / "Sentences" / "1002.txt").unlink()
    with pytest.raises(LadsError, match=r"1002\.txt: unreadable sentences \(FileNotFoundError\)"):
        load_records(flickr_dir, "val")
    assert load_records(flickr_dir, None)[1]["unreadable sentences"] == 1
    for split in ("train", "val", "test"):
        (flickr_dir / f"{split}.txt").unlink()
    with pytest.raises(LadsError, match="needs train.txt, val.txt or test.txt"):
        load_records(flickr_dir, "train")


VG_IMAGES = [
    {"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg", "width": 64, "height": 48,
     "coco_id": 581857, "flickr_id": None},
    {"image_id": 2, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.jpg", "width": 32, "height": 32,
     "coco_id": None, "flickr_id": 123},
]


def region(rid, image_id, phrase, x, y, w, h):
    return {"region_id": rid, "image_id": image_id, "phrase": phrase, "x": x, "y": y, "width": w, "height": h}


VG_REGIONS = [
    {"id": 1, "regions": [region(10, 1, "a man riding a horse", 2, 3, 20, 10), region(11, 1, "", 0, 0, 5, 5),
                          region(12, 1, "a thin line", 4, 4, 0, 10), region(13, 1, "tall sign", 60, 0, 30, 5)]},
    {"id": 2, "regions": [region(20, 2, "white clouds ", 0, 0, 32, 16), region(21, 2, "grass", 0, 16, 32, 16),
                          {"region_id": 22, "image_id": 2, "phrase": "no box"}]},
    {"id": 3, "regions": [region(30, 3, "an image without data", 0, 0, 5, 5)]},
]


@pytest.fixture
def vg_dir(tmp_path):
    folder = tmp_path / "visual_genome"
    folder.mkdir()
    (folder / "image_data.json").write_text(json.dumps(VG_IMAGES))
    (folder / "region_descriptions.json").write_text(json.dumps(VG_REGIONS, indent=1))
    save_image(folder / "VG_100K" / "1.jpg", (64, 48))
    save_image(folder / "VG_100K_2" / "2.jpg", (32, 32))
    return folder


def test_visual_genome_regions_two_folders_and_skips(vg_dir):
    assert known_splits(vg_dir) == ["train"]
    records, skipped = load_records(vg_dir, "train")
    assert [r.expression for r in records] == ["a man riding a horse", "white clouds", "grass"]
    assert skipped == Counter({"empty expression": 1, "box with zero or negative size": 1, "box outside image": 1,
                               "malformed region": 1, "image missing from image_data.json": 1})
    man, clouds = records[0], records[1]
    assert man.box == (2.0, 3.0, 22.0, 13.0) and (man.image_id, man.ann_id, man.coco_id) == (1, 10, 581857)
    assert man.image == str(vg_dir / "VG_100K" / "1.jpg") and clouds.image == str(vg_dir / "VG_100K_2" / "2.jpg")
    assert all(Path(r.image).is_file() for r in records)
    assert clouds.coco_id is None and man.dataset == "visual_genome" and man.split == "train"


def test_visual_genome_bad_json_names_file_and_line(vg_dir):
    text = json.dumps(VG_REGIONS, indent=1)
    (vg_dir / "region_descriptions.json").write_text(text[: len(text) // 2] + "}, ]")
    with pytest.raises(LadsError, match=r"region_descriptions\.json:\d+:\d+: not a JSON array"):
        load_records(vg_dir, "train")
    (vg_dir / "region_descriptions.json").write_text('{"regions": []}')
    with pytest.raises(LadsError, match=r"region_descriptions\.json:1:1: not a JSON array \(expected '\['\)"):
        load_records(vg_dir, "train")
    (vg_dir / "region_descriptions.json").write_text(json.dumps([{"id": 1}, *VG_REGIONS[:1]]))
    assert load_records(vg_dir, "train")[1]["malformed image entry"] == 1
    (vg_dir / "image_data.json").write_text(json.dumps([{"image_id": 1}]))
    with pytest.raises(LadsError, match=r"image_data\.json item 0: not an image entry"):
        load_records(vg_dir, "train")
    (vg_dir / "image_data.json").unlink()
    with pytest.raises(LadsError, match=r"image_data\.json: missing"):
        load_records(vg_dir, "train")


def test_transvg_flickr_split_files(tmp_path):
    folder = tmp_path / "flickr"
    folder.mkdir()
    torch.save([("1001.jpg", [0, 0, 19, 9], "A man"), ("1001.jpg", [4, 4, 39, 29], "two kids"), ("1001.jpg", [1, 2])],
               folder / "flickr_train.pth")
    torch.save([("1002.jpg", [1, 1, 63, 47], "a red hat")], folder / "flickr_test.pth")
    assert known_splits(folder) == ["train", "test"]
    records, skipped = load_records(folder, "train")
    assert [(r.expression, r.box, r.dataset) for r in records] == [
        ("A man", (0.0, 0.0, 19.0, 9.0), "flickr"), ("two kids", (4.0, 4.0, 39.0, 29.0), "flickr")]
    assert skipped == Counter({"expected": 1})  # the reason of every malformed TransVG item
    assert records[0].image == str(folder / "images" / "1001.jpg")


def test_data_stats_reads_the_new_formats(flickr_dir, vg_dir):
    result = subprocess.run([sys.executable, "-m", "lads.cli", "data", "stats", str(flickr_dir), str(vg_dir)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    by = {(Path(r[0]).name, r[1]): r for r in rows if len(r) > 2 and r[1] in ("train", "val", "test")}
    assert by[("flickr30k_entities", "train")][4] == "3" and by[("flickr30k_entities", "train")][7] == "5"
    assert by[("visual_genome", "train")][2:5] == ["2", "3", "3"]
    assert "skipped 2: entity without a box" in result.stdout
