"""``lads data stats PATH [PATH ...]``: per-split counts of images, objects and expressions,
expression lengths in words, the records skipped, by reason, and the image files missing."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from lads.datasets import read_dataset
from lads.errors import LadsError

COLUMNS = ("dataset", "split", "images", "objects", "expressions", "mean words", "max words",
           "skipped", "missing images")


def add_arguments(parser):
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="a REFER folder, a TransVG split file or folder, or a .jsonl file")
    parser.add_argument("--split", nargs="+", help="only these splits (default: all)")
    parser.add_argument("--split-by", help="REFER refs(<splitBy>).p to read (default: unc, "
                        "then umd, berkeley, google)")
    parser.add_argument("--image-root", help="folder the image paths are relative to (default: the "
                        "dataset's images/ folder; the JSONL file's folder)")
    parser.add_argument("--no-image-check", action="store_true",
                        help="do not check that every image file exists (for huge sets)")


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


def run(args):
    if args.image_root and not Path(args.image_root).is_dir():
        raise LadsError(f"--image-root {args.image_root}: no such folder")
    rows, notes = [], []
    for path in args.paths:
        dataset = read_dataset(path, args.split, image_root=args.image_root,
                               split_by=args.split_by)
        missing = None if args.no_image_check else {i for i in {r.image for r in dataset.records}
                                                     if not Path(i).is_file()}
        rows += split_rows(path, dataset, missing)
        if missing:
            notes.append(f"{path}: {len(missing)} image file(s) missing (first: {min(missing)}); "
                         "--image-root names the folder the images are in")
        reasons = Counter()
        for (_, reason), n in dataset.skipped.items():
            reasons[reason] += n
        for reason, n in reasons.most_common():
            notes.append(f"{path}: skipped {n}: {reason} (first: {dataset.examples[reason]})")
    print(format_table(rows))
    if notes:
        print("\n" + "\n".join(notes))
