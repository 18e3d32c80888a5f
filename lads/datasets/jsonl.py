"""JSONL: a user's own data, one expression per line (the format is in ``docs/data.md``).

``{"image": "a.jpg", "expression": "the red cup", "box": [x1, y1, x2, y2],
"box_format": "xyxy", "split": "test", "id": 7}``; only the first three keys are required.
Relative image paths are resolved against ``image_root``, by default the file's folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from lads.datasets.image_roots import find_image_root
from lads.datasets.records import Collector, Record
from lads.errors import LadsError

BOX_FORMATS = ("xyxy", "xywh")
DEFAULT_SPLIT = "test"


def _parse(line: str) -> dict:
    """The fields of one line; ``ValueError(reason)`` if it is not a usable record."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(item, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in ("image", "expression", "box") if k not in item]
    if missing:
        raise ValueError(f"missing field ({', '.join(missing)})")
    if not isinstance(item["image"], str) or not isinstance(item["expression"], str):
        raise ValueError("image and expression must be strings")
    if item.get("box_format", "xyxy") not in BOX_FORMATS:
        raise ValueError(f"unknown box_format ({item['box_format']!r}; use xyxy or xywh)")
    return item


def read(path: Path, collector: Collector, *, image_root=None) -> set[str]:
    """Add the records of the wanted splits in ``path`` to ``collector``; return every split."""
    collector.image_root = find_image_root(image_root, path.parent)
    image_root = collector.image_root.path
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LadsError(f"{path}: cannot read ({e})") from None
    splits = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = _parse(line)
        except ValueError as e:
            collector.skip(None, where, str(e))
            continue
        split = str(item.get("split", DEFAULT_SPLIT))
        splits.add(split)
        if collector.wants(split):
            record = Record(
                image=str(image_root / item["image"]),
                expression=item["expression"],
                box=item["box"],
                dataset=path.stem,
                split=split,
                sent_id=item.get("id"),
                source=where,
            )
            collector.add(record, None, item.get("box_format", "xyxy"))
    return splits
