"""``lads data stats PATH [PATH ...]``: per-split counts of images, objects and expressions,
expression lengths in words, and the records skipped, by reason."""

from __future__ import annotations

from collections import Counter, defaultdict

from lads.datasets import read_dataset

COLUMNS = ("dataset", "split", "images", "objects", "expressions", "mean words", "max words",
           "skipped")


def add_arguments(parser):
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="a REFER folder, a TransVG split file or folder, or a .jsonl file")
    parser.add_argument("--split", nargs="+", help="only these splits (default: all)")
    parser.add_argument("--split-by", help="REFER refs(<splitBy>).p to read (default: unc, "
                        "then umd, berkeley, google)")
    parser.add_argument("--image-root", help="folder the image paths are relative to")


def split_rows(path, dataset) -> list[tuple]:
    """One row per split, the columns of ``COLUMNS``; lines with no readable split get "-"."""
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
        rows.append((path, split, len({r.image for r in records}), len(objects), len(records),
                     f"{sum(words) / len(words):.1f}" if words else "-", max(words, default=0),
                     skipped[split]))
    return rows


def format_table(rows) -> str:
    cells = [COLUMNS] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    )


def run(args):
    rows, notes = [], []
    for path in args.paths:
        dataset = read_dataset(path, args.split, image_root=args.image_root,
                               split_by=args.split_by)
        rows += split_rows(path, dataset)
        reasons = Counter()
        for (_, reason), n in dataset.skipped.items():
            reasons[reason] += n
        for reason, n in reasons.most_common():
            notes.append(f"{path}: skipped {n}: {reason} (first: {dataset.examples[reason]})")
    print(format_table(rows))
    if notes:
        print("\n" + "\n".join(notes))
