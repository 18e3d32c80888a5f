"""Images of every mode load as RGB; broken or missing ones name the file and the record."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from lads.datasets import load_records
from lads.datasets.dataset import RecDataset
from lads.datasets.images import open_rgb
from lads.datasets.records import Record
from lads.errors import LadsError


def gradient(mode, w=32, h=24):
    ramp = np.tile(np.linspace(0, 1, w), (h, 1))
    if mode == "I;16":
        return Image.fromarray((ramp * 65535).astype(np.uint16))
    rgb = Image.fromarray((np.stack([ramp, ramp[::-1], ramp], -1) * 255).astype(np.uint8))
    return rgb.convert(mode)


@pytest.mark.parametrize("mode, ext", [
    ("L", "png"), ("L", "jpg"), ("L", "tiff"), ("RGBA", "png"), ("LA", "png"), ("P", "png"),
    ("P", "gif"), ("CMYK", "jpg"), ("CMYK", "tiff"), ("I;16", "png"), ("I;16", "tiff"), ("1", "png"),
])
def test_modes_convert_to_rgb(tmp_path, mode, ext):
    path = tmp_path / f"img.{ext}"
    gradient(mode).save(path)
    img = open_rgb(str(path))
    assert img.mode == "RGB" and img.size == (32, 24)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert np.asarray(open_rgb(str(path)))[0, :, 0].tolist() == [0, 100, 255]


def test_transparency_and_exif_orientation(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 2), (0, 0, 0, 0)).save(path)
    assert np.asarray(open_rgb(str(path))).min() == 255  # transparent over white
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20)).save(rotated, exif=exif)
    assert open_rgb(str(rotated)).size == (20, 40)


def test_broken_images_name_file_and_record(tmp_path):
    truncated = tmp_path / "cut.jpg"
    gradient("RGB", 200, 200).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    for path in (truncated, text):
        with pytest.raises(LadsError, match=rf"rec 7, image {path}: unreadable image"):
            open_rgb(str(path), "rec 7")
    with pytest.raises(LadsError, match=rf"rec 8, image {tmp_path}/gone.jpg: image not found"):
        open_rgb(str(tmp_path / "gone.jpg"), "rec 8")


def test_dataset_with_bad_records_yields_the_good_ones(refer_dir, tokenizer):
    records, skipped = load_records(refer_dir, None)
    assert len(records) == 6 and sum(skipped.values()) == 3  # the reader's share
    images = refer_dir / "images"
    (images / "COCO_train2014_000000000002.jpg").write_text("not a jpeg")
    cut = images / "COCO_train2014_000000000003.jpg"
    cut.write_bytes(cut.read_bytes()[:300])
    big_box = Record(str(images / "COCO_train2014_000000000001.jpg"), "huge", (0, 0, 500, 500),
                     "mine", "test", source="mine.jsonl:1")
    missing = Record(str(images / "nope.jpg"), "gone", (0, 0, 5, 5), "mine", "test", source="mine.jsonl:2")
    dataset = RecDataset(records + [big_box, missing], tokenizer, image_size=32)

    with pytest.raises(LadsError, match=r"ref 3 sentence 103, image .*000000000002\.jpg: unreadable"):
        dataset[records.index(next(r for r in records if r.image_id == 2))]
    with pytest.raises(LadsError, match=r"mine\.jsonl:1, image .*: box outside image \(64x48\)"):
        dataset[len(records)]

    problems = dataset.check_images(drop=True)
    assert problems == Counter({"unreadable image": 2, "box outside image": 1, "image not found": 1})
    assert len(dataset) == 4 and all(r.image_id == 1 for r in dataset.records)
    assert [dataset[i]["image"].shape for i in range(len(dataset))] == [(3, 32, 32)] * 4
