"""Visual Genome v1.2 region descriptions (Krishna et al., IJCV 2017).

A dataset folder holds ``region_descriptions.json`` — a list, per image, of
``{"id": image id, "regions": [{"region_id", "image_id", "phrase", "x", "y", "width",
"height"}]}`` with ``[x, y, width, height]`` boxes in pixels — and ``image_data.json``: per image
``{"image_id" (v1.0: "id"), "url", "width", "height", "coco_id", "flickr_id"}``. The images are
split over ``VG_100K/`` and ``VG_100K_2/``; the folder of each is the one named in its ``url``.
Images are looked up in ``image_root`` (default: the dataset folder).

One record per region, all in split ``train`` (Visual Genome has no REC splits). Empty phrases
and boxes with zero width or height are skipped and counted; ``coco_id`` is kept, so that a
leak-free mixture can drop the regions of COCO images that RefCOCO/+/g evaluate on.

``region_descriptions.json`` is 0.7 GB: it is decoded one image at a time, never whole.
"""

from __future__ import annotations

import json
from pathlib import Path

from lads.datasets.image_roots import find_image_root
from lads.datasets.records import Collector, Record
from lads.errors import LadsError

REGIONS, IMAGES = "region_descriptions.json", "image_data.json"
SPLIT = "train"


def is_visual_genome(folder: Path) -> bool:
    return (folder / REGIONS).is_file()


def iter_json_array(path: Path):
    """The items of the JSON array in ``path``, decoded one at a time; ``LadsError`` naming the
    line and column where the file stops being JSON."""
    decoder = json.JSONDecoder()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LadsError(f"{path}: cannot read ({e})") from None

    def fail(pos, what):
        line = text.count("\n", 0, pos) + 1
        raise LadsError(f"{path}:{line}:{pos - text.rfind(chr(10), 0, pos)}: not a JSON array ({what})")

    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        fail(pos, "expected '['")
    pos = _skip_space(text, pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            fail(e.pos, e.msg)
        yield item
        pos = _skip_space(text, pos)
        if text.startswith("]", pos):
            return
        if not text.startswith(",", pos):
            fail(pos, "expected ',' or ']'")
        pos = _skip_space(text, pos + 1)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def read_images(path: Path) -> dict:
    """``{image id: (relative image path, (w, h) or None, coco id)}`` from ``image_data.json``."""
    images = {}
    for i, item in enumerate(iter_json_array(path)):
        try:
            image_id = int(item["image_id"] if "image_id" in item else item["id"])
            folder, name = str(item["url"]).rstrip("/").split("/")[-2:]
            size = (int(item["width"]), int(item["height"])) if item.get("width") and item.get("height") else None
            coco = item.get("coco_id")
            images[image_id] = (f"{folder}/{name}", size, int(coco) if coco is not None else None)
        except (KeyError, TypeError, ValueError) as e:
            raise LadsError(f"{path} item {i}: not an image entry ({type(e).__name__}: {e})") from None
    return images


def read(folder: Path, collector: Collector, *, image_root=None) -> set[str]:
    """Add every region to ``collector`` (if it wants ``train``); return ``{"train"}``."""
    if not collector.wants(SPLIT):
        return {SPLIT}
    if not (folder / IMAGES).is_file():
        raise LadsError(f"{folder / IMAGES}: missing (Visual Genome needs it for image files and sizes)")
    images = read_images(folder / IMAGES)
    first = next(iter(images.values()), (None,))[0]
    collector.image_root = find_image_root(image_root, folder, folder, ("visual_genome",), first)
    image_root = collector.image_root.path
    for i, entry in enumerate(iter_json_array(folder / REGIONS)):
        regions = entry.get("regions") if isinstance(entry, dict) else None
        if not isinstance(regions, list):
            collector.skip(SPLIT, f"{folder / REGIONS} item {i}", "malformed image entry (no regions list)")
            continue
        for region in regions:
            where = f"{folder / REGIONS} image {entry.get('id')} region {_get(region, 'region_id')}"
            try:
                _add_region(region, images, image_root, where, collector)
            except (KeyError, TypeError, ValueError) as e:
                collector.skip(SPLIT, where, f"malformed region ({type(e).__name__}: {e})")
    return {SPLIT}


def _get(item, key):
    return item.get(key) if isinstance(item, dict) else None


def _add_region(region, images, image_root, where, collector):
    image_id = int(region["image_id"])
    if image_id not in images:
        return collector.skip(SPLIT, where, "image missing from image_data.json")
    path, size, coco_id = images[image_id]
    record = Record(
        image=str(image_root / path),
        expression=region["phrase"],
        box=[region["x"], region["y"], region["width"], region["height"]],
        dataset="visual_genome",
        split=SPLIT,
        ann_id=region.get("region_id"),
        image_id=image_id,
        source=where,
        coco_id=coco_id,
    )
    collector.add(record, size, "xywh")
