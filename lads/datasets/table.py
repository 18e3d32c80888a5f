"""Records at the paper's scale: NumPy columns and two string tables, memory-mapped from disk.

The pre-training corpus holds ~6.1 M expressions. As ``Record`` objects they take several GB,
and a forked data-loader worker soon holds its own copy: reading a Python object writes its
reference count, which copies the page. A ``RecordTable`` keeps the same fields in a few flat
arrays (docs/data.md, "At scale")::

    boxes     float32 (N, 4)   x1, y1, x2, y2 in pixels
    image     int32   (N,)     row of the image table: path, image_id, coco_id (-1: none)
    split, dataset, expr_type  uint16 (N,) codes of the names in table.json
    ref_id, ann_id, sent_id    int64 (N,) (-1: none)
    expressions                UTF-8 bytes and N + 1 offsets

Saved as ``.npy`` files in a folder (with ``table.json``: names, counts, what was skipped) and
opened memory-mapped, the arrays are read straight from the page cache: every worker and every
process of the machine share one copy, and opening takes milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lads.datasets.records import Record
from lads.errors import LadsError

FORMAT = 1
META = "table.json"
NAMED = ("split", "dataset", "expr_type")
IDS = ("ref_id", "ann_id", "sent_id")


class Records(Sequence):
    """A read-only sequence of ``Record`` made on access (``RecordTable``, ``Mixture``)."""


def _strings(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    data = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    return np.frombuffer(b"".join(data), np.uint8), offsets


class TableBuilder:
    """Collects records column by column (a ``Collector`` sink): a few bytes per record, never
    a Python object per record."""

    def __init__(self):
        self.boxes, self.image = array("f"), array("i")
        self.codes = {k: array("H") for k in NAMED}
        self.ids = {k: array("q") for k in IDS}
        self.expr, self.expr_ends = bytearray(), array("q")
        self.names = {k: {} for k in NAMED}
        self.images: dict[str, int] = {}
        self.image_ids, self.coco_ids = array("q"), array("q")

    def __len__(self) -> int:
        return len(self.image)

    def _code(self, kind: str, name) -> int:
        return self.names[kind].setdefault(name, len(self.names[kind]))

    def append(self, r: Record) -> None:
        self.boxes.extend(r.box)
        row = self.images.get(r.image)
        if row is None:
            row = self.images[r.image] = len(self.images)
            self.image_ids.append(-1 if r.image_id is None else r.image_id)
            self.coco_ids.append(-1 if r.coco_id is None else r.coco_id)
        self.image.append(row)
        for kind in NAMED:
            self.codes[kind].append(self._code(kind, getattr(r, kind)))
        for kind in IDS:
            value = getattr(r, kind)
            self.ids[kind].append(-1 if value is None else int(value))
        self.expr += r.expression.encode("utf-8")
        self.expr_ends.append(len(self.expr))

    def table(self, origin: str = "", meta: dict | None = None) -> RecordTable:
        """The records so far as an in-memory ``RecordTable``; ``meta`` goes to ``table.json``."""
        n = len(self)
        image_bytes, image_offsets = _strings(list(self.images))
        columns = {
            "boxes": np.frombuffer(self.boxes, np.float32).reshape(n, 4),
            "image": np.frombuffer(self.image, np.int32),
            **{k: np.frombuffer(self.codes[k], np.uint16) for k in NAMED},
            **{k: np.frombuffer(self.ids[k], np.int64) for k in IDS},
            "expr_bytes": np.frombuffer(self.expr, np.uint8),
            "expr_offsets": np.concatenate([[0], np.frombuffer(self.expr_ends, np.int64)]),
            "image_bytes": image_bytes, "image_offsets": image_offsets,
            "image_id": np.frombuffer(self.image_ids, np.int64), "coco_id": np.frombuffer(self.coco_ids, np.int64),
        }
        names = {k: list(v) for k, v in self.names.items()}
        return RecordTable(columns, {"format": FORMAT, "count": n, "origin": origin, "names": names, **(meta or {})})


class RecordTable(Records):
    """Records as columns; ``table[i]`` is a ``Record``. ``open(folder)`` memory-maps a saved one."""

    def __init__(self, columns: dict[str, np.ndarray], meta: dict, folder: Path | None = None):
        self.columns, self.meta, self.folder = columns, meta, folder
        self.names = meta["names"]

    @classmethod
    def from_records(cls, records, origin: str = "", meta: dict | None = None) -> RecordTable:
        builder = TableBuilder()
        for r in records:
            builder.append(r)
        return builder.table(origin, meta)

    def __len__(self) -> int:
        return int(self.meta["count"])

    def __getitem__(self, i) -> Record:
        if not isinstance(i, (int, np.integer)):
            raise TypeError("a RecordTable is indexed by one integer")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} of {n}")
        i = int(i) % n
        c = self.columns
        row = int(c["image"][i])
        ids = {k: (int(c[k][i]) if c[k][i] >= 0 else None) for k in IDS}
        image_id, coco_id = int(c["image_id"][row]), int(c["coco_id"][row])
        split = self.names["split"][c["split"][i]]
        return Record(
            image=_string(c["image_bytes"], c["image_offsets"], row),
            expression=_string(c["expr_bytes"], c["expr_offsets"], i),
            box=tuple(float(v) for v in c["boxes"][i]),
            dataset=self.names["dataset"][c["dataset"][i]],
            split=split,
            image_id=None if image_id < 0 else image_id,
            expr_type=self.names["expr_type"][c["expr_type"][i]],
            source=f"{self.meta['origin']} [{split}] record {i}",
            coco_id=None if coco_id < 0 else coco_id,
            **ids,
        )

    def rows(self, split: str) -> np.ndarray:
        """The row numbers of ``split``'s records."""
        names = self.names["split"]
        if split not in names:
            raise LadsError(f"{self.meta['origin']}: no split {split!r}; this dataset has "
                            f"{', '.join(map(str, names)) or 'no records'}")
        return np.flatnonzero(self.columns["split"] == names.index(split))

    def record_coco_ids(self, rows: np.ndarray) -> np.ndarray:
        """The COCO id (-1: none) of the image of each record in ``rows``."""
        return self.columns["coco_id"][self.columns["image"][rows]]

    def skipped(self) -> Counter:
        return Counter({reason: n for _, reason, n in self.meta.get("skipped", [])})

    # ------------------------------------------------------------------------- on disk

    def save(self, folder) -> Path:
        """Write the table to ``folder`` atomically (a sibling written first, then renamed)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
        for name, column in self.columns.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(column))
        (tmp / META).write_text(json.dumps(self.meta, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process wrote the same table first
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / META).exists():
                raise
        return folder

    @classmethod
    def open(cls, folder) -> RecordTable:
        """A saved table, its columns memory-mapped read-only."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / META).read_text())
            if meta.get("format") != FORMAT:
                raise LadsError(f"{folder}: record table format {meta.get('format')}, expected {FORMAT}; "
                                "delete the folder to rebuild it")
            columns = {p.stem: np.load(p, mmap_mode="r") for p in sorted(folder.glob("*.npy"))}
        except (OSError, ValueError) as e:
            raise LadsError(f"{folder}: not a readable record table ({type(e).__name__}: {e})") from None
        return cls(columns, meta, folder)

    def __reduce__(self):
        """A saved table travels to a spawned worker as its folder, never as its arrays."""
        if self.folder is not None:
            return (RecordTable.open, (str(self.folder),))
        return (RecordTable, (self.columns, self.meta))


def _string(data: np.ndarray, offsets: np.ndarray, i: int) -> str:
    return data[offsets[i] : offsets[i + 1]].tobytes().decode("utf-8")
