"""What ``lads data stats`` prints: per-split counts of images, objects and expressions,
expression lengths in words, the records skipped, by reason, and the image files missing."""

from __future__ import annotations

from collections import Counter, defaultdict

COLUMNS = ("dataset", "split", "images", "objects", "expressions", "mean words", "max words",
           "skipped", "missing images")


def split_rows(path, dataset, missing: set | None = None) -> list[tuple]:
    """One row per split, the columns of ``COLUMNS``; lines with no readable split get "-";
    ``missing``: the image files not found (None: not checked, "-")."""
    by_split = defaultdict(list)
    for r in dataset.records:
        by_split[r.split].append(r)
    skipped = Counter()
    for (split, _), n in dataset.skipped.items():
        skipped[split or "-"] += n
    rows = []
    present = [s for s in dataset.splits if s in by_split or s in skipped]
    for split in present + ["-"] * ("-" in skipped):
        records = by_split[split]
        words = [len(r.expression.split()) for r in records]
        objects = {r.ann_id if r.ann_id is not None else (r.image, r.box) for r in records}
        images = {r.image for r in records}
        rows.append((path, split, len(images), len(objects), len(records),
                     f"{sum(words) / len(words):.1f}" if words else "-", max(words, default=0),
                     skipped[split], "-" if missing is None else len(images & missing)))
    return rows


def format_table(rows) -> str:
    cells = [COLUMNS] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    )
