"""The internal record (one per expression) and the checks every reader applies to it.

Box policy, the same for every format: a box must be finite and have positive width and
height. Where the image size is known (REFER's ``instances.json``; for the other formats when
the image is opened), a box may stick out of the image by at most ``BOX_SLACK`` pixels (float
rounding in the annotations) and is clipped to it; a box further outside is bad. A bad record
is skipped and counted under its reason, or raises ``RecordError`` in strict mode.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from lads.errors import LadsError

BOX_SLACK = 2.0  # pixels a box may extend past the image border before it counts as outside
COCO_FILE = re.compile(r"COCO_(?:train|val)2014_0*(\d+)\.jpg$")

Box = tuple[float, float, float, float]


@dataclass
class Record:
    """One referring expression and the box it refers to, ``(x1, y1, x2, y2)`` in pixels."""

    image: str
    expression: str
    box: Box
    dataset: str
    split: str
    ref_id: int | None = None
    ann_id: int | None = None
    image_id: int | None = None
    sent_id: int | None = None
    expr_type: str | None = None
    source: str = ""  # where it came from, for messages: "refs(unc).p ref 3 sentence 7"
    coco_id: int | None = None  # the COCO image it shows, if any: what leak-free mixtures compare


def coco_id_of(image: str) -> int | None:
    """The COCO id of an image named like COCO's own files (``COCO_train2014_<12 digits>.jpg``)."""
    m = COCO_FILE.search(image)
    return int(m.group(1)) if m else None


class RecordError(LadsError):
    """A record that cannot be used; ``reason`` is the short key it is counted under."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def parse_box(value, box_format: str = "xyxy") -> Box:
    """Four numbers in ``box_format`` ("xyxy" or "xywh") as floats ``(x1, y1, x2, y2)``."""
    try:
        x, y, a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"box must be four numbers (got {value!r})") from None
    return (x, y, x + a, y + b) if box_format == "xywh" else (x, y, a, b)


def fit_box(box: Box, size: tuple[int, int] | None = None) -> Box:
    """``box`` clipped to an image of ``size`` (w, h); ``ValueError(reason)`` if it is bad."""
    if not all(math.isfinite(v) for v in box):
        raise ValueError("box is not four finite numbers")
    x1, y1, x2, y2 = box
    if size is not None:
        w, h = size
        if x1 < -BOX_SLACK or y1 < -BOX_SLACK or x2 > w + BOX_SLACK or y2 > h + BOX_SLACK:
            raise ValueError(f"box outside image ({w}x{h})")
        x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
    if x2 <= x1 or y2 <= y1:
        raise ValueError("box with zero or negative size")
    return (x1, y1, x2, y2)


def short_reason(message: str) -> str:
    """The counting key of a reason: its text before any parenthesised detail."""
    return message.split(" (")[0]


class Collector:
    """Gathers the good records of the wanted splits; counts or raises on the bad ones.

    ``skipped`` counts ``(split, reason)``; split is None where a line had no readable split.
    ``examples`` keeps the first record skipped for each reason, for messages. ``sink`` receives
    the good records (anything with ``append`` and ``len``; default: a list), e.g. a
    ``TableBuilder`` that stores millions of them compactly.
    """

    def __init__(self, splits: set[str] | None = None, strict: bool = False, sink=None):
        self.splits = splits
        self.strict = strict
        self.records = [] if sink is None else sink
        self.skipped: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.image_root = None  # the ImageRoot the reader resolved image names against

    def wants(self, split: str) -> bool:
        return self.splits is None or split in self.splits

    def skip(self, split: str | None, where: str, reason: str, error: bool = True) -> None:
        """Count a record left out; ``error=False``: left out by the format's design (a phrase
        with no box), which strict mode counts too rather than raising."""
        if self.strict and error:
            raise RecordError(where, reason)
        key = short_reason(reason)
        self.skipped[(split, key)] += 1
        self.examples.setdefault(key, f"{where}: {reason}")

    def add(self, record: Record, size=None, box_format: str = "xyxy") -> None:
        """Check and keep ``record`` (or skip it). Its ``box`` is still raw, in ``box_format``;
        it becomes a clipped xyxy tuple. ``size`` is the image's (w, h) where known."""
        record.expression = str(record.expression or "").strip()
        if not record.expression:
            return self.skip(record.split, record.source, "empty expression")
        try:
            record.box = fit_box(parse_box(record.box, box_format), size)
        except ValueError as e:
            return self.skip(record.split, record.source, str(e))
        if record.coco_id is None:
            record.coco_id = coco_id_of(record.image)
        self.records.append(record)
