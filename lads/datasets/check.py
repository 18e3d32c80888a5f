"""``lads data check``: a copy of a dataset against its published counts (docs/data.md,
"Is my copy right?").

The counts are read from the annotation files as distributed, before any record check: per split,
the expressions (REFER sentences, TransVG items), the objects (REFER refs) and the images. They are
compared with ``PUBLISHED`` (sources in docs/data.md) or with counts the user gives, and every
image of the split is looked for on disk.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lads.errors import LadsError

COUNTED = ("expressions", "objects", "images")

# dataset -> split -> (expressions, objects, images); None where not published. Sources: docs/data.md.
PUBLISHED = {
    "refcoco/unc": {"train": (120624, 42404, 16994), "val": (10834, 3811, 1500),
                    "testA": (5657, 1975, 750), "testB": (5095, 1810, 750)},
    "refcoco/google": {"train": (None, 40000, 19213), "val": (None, 5000, 4559), "test": (None, 5000, 4527)},
    "refcoco+/unc": {"train": (120191, 42278, 16992), "val": (10758, 3805, 1500),
                     "testA": (5726, 1975, 750), "testB": (4889, 1798, 750)},
    "refcocog/umd": {"train": (80512, 42226, 21899), "val": (4896, 2573, 1300), "test": (9602, 5023, 2600)},
    "refcocog/google": {"train": (85474, 44822, 24698), "val": (9536, 5000, 4650)},
    "refclef/berkeley": {"train": (54127, None, None), "val": (5842, None, None), "test": (60103, None, None)},
    "transvg/unc": {"train": (120624, None, 16994), "val": (10834, None, 1500),
                    "testA": (5657, None, 750), "testB": (5095, None, 750)},
    "transvg/unc+": {"train": (120191, None, 16992), "val": (10758, None, 1500),
                     "testA": (5726, None, 750), "testB": (4889, None, 750)},
    "transvg/gref": {"train": (85474, None, 24698), "val": (9536, None, 4650)},
    "transvg/gref_umd": {"train": (80512, None, 21899), "val": (4896, None, 1300), "test": (9602, None, 2600)},
    "transvg/referit": {"train": (54127, None, None), "val": (5842, None, None), "test": (60103, None, None)},
    "flickr30k_entities": {"train": (None, None, 29783), "val": (None, None, 1000), "test": (None, None, 1000)},
}


@dataclass
class SplitCheck:
    split: str
    found: dict  # counted -> int
    expected: dict  # counted -> int (only what is known)
    images_missing: int | None = None  # None: not checked

    @property
    def mismatches(self) -> list[str]:
        differ = [k for k, n in self.expected.items() if self.found[k] != n]
        wrong = [f"differs in {', '.join(differ)}"] if differ else []
        if self.images_missing:
            wrong.append(f"{self.images_missing:,} image file(s) missing")
        return wrong


@dataclass
class CheckReport:
    path: str
    dataset: str | None  # the key into PUBLISHED, or None for data without published counts
    against: str | None  # "published", "expected" (counts given) or None (nothing to compare with)
    image_root: str
    splits: list[SplitCheck] = field(default_factory=list)
    missing_by_folder: dict = field(default_factory=dict)  # folder -> (missing, images, first missing)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.notes and not any(s.mismatches for s in self.splits)

    def lines(self) -> list[str]:
        compared = {"published": "the published counts", "expected": "the counts given"}.get(self.against)
        out = [f"{self.path}: {self.dataset or 'dataset without published counts'}, against "
               f"{compared or 'no counts'}; {self.image_root}"]
        for s in self.splits:
            counts = ", ".join(f"{k} {s.found[k]:,}" + (f" / {s.expected[k]:,}" if k in s.expected else "")
                               for k in COUNTED)
            state = "; ".join(s.mismatches) or "ok"
            out.append(f"  {s.split}: {counts}" + (f" (found / {self.against})" if s.expected else "") + f": {state}")
        for folder, (missing, total, first) in sorted(self.missing_by_folder.items()):
            out.append(f"  missing images: {missing:,} of {total:,} in {folder} (first: {first})")
        out += [f"  {n}" for n in self.notes]
        return out


def dataset_key(path, split_by=None) -> str | None:
    """The ``PUBLISHED`` key of the dataset at ``path``: ``<REFER folder>/<splitBy>``,
    ``transvg/<ds>``, ``flickr30k_entities``; None for data without published counts."""
    from lads.datasets import detect_reader, flickr30k, refer, transvg

    reader, where, kwargs = detect_reader(Path(path), split_by)
    if reader is refer.read:
        name = where.name.lower()
        return f"{name}/{kwargs['split_by'] or refer.split_bys(where)[0]}"
    if reader is transvg.read:
        return f"transvg/{transvg.dataset_name(where)}"
    if reader is flickr30k.read:
        return "flickr30k_entities"
    return None


def raw_counts(path, split_by, records) -> dict[str, dict]:
    """``{split: {expressions, objects, images}}`` from the annotation files as they are (REFER,
    TransVG, Flickr30k Entities' image lists); otherwise from ``records``, those the reader kept."""
    from lads.datasets import detect_reader, flickr30k, refer, transvg

    reader, where, kwargs = detect_reader(Path(path), split_by)
    sets = defaultdict(lambda: {"expressions": 0, "objects": set(), "images": set()})
    if reader is refer.read:
        _, refs = refer.read_refs(where, kwargs["split_by"])
        for r in refs:
            s = sets[str(r.get("split"))]
            s["expressions"] += len(r.get("sentences") or [])
            s["objects"].add(r.get("ann_id"))
            s["images"].add(r.get("image_id"))
    elif reader is transvg.read:
        for split, file in transvg.split_files(where).items():
            s = sets[split]
            for item in transvg.load_items(file):
                s["expressions"] += 1
                if isinstance(item, (list, tuple)) and item:
                    s["images"].add(str(item[0]))
    elif reader is flickr30k.read:
        for split, ids in flickr30k.read_split_lists(where).items():
            sets[split]["images"].update(ids)
        for r in records:
            sets[r.split]["expressions"] += 1
    else:
        for r in records:
            s = sets[r.split]
            s["expressions"] += 1
            s["objects"].add(r.ann_id if r.ann_id is not None else (r.image, r.box))
            s["images"].add(r.image)
    return {split: {"expressions": s["expressions"], "objects": len(s["objects"]), "images": len(s["images"])}
            for split, s in sets.items()}


def read_expected(path) -> dict:
    """``{split: {counted: n}}`` from a JSON file (``lads data check --expect``)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LadsError(f"--expect {path}: not a readable JSON file ({e})") from None
    ok = isinstance(data, dict) and all(isinstance(v, dict) and set(v) <= set(COUNTED)
                                        and all(isinstance(n, int) for n in v.values()) for v in data.values())
    if not ok:
        raise LadsError(f"--expect {path}: expected {{split: {{{', '.join(COUNTED)}: integer}}}}")
    return data


def check(path, *, image_root=None, split_by=None, expected: dict | None = None, images: bool = True) -> CheckReport:
    """Count ``path`` per split, compare with ``expected`` (default: ``PUBLISHED``) and look for
    every image file (unless ``images`` is False)."""
    from lads.datasets import read_dataset

    key = dataset_key(path, split_by)
    against = "expected" if expected is not None else "published" if key in PUBLISHED else None
    if expected is None and key in PUBLISHED:
        expected = {split: {k: n for k, n in zip(COUNTED, counts) if n is not None}
                    for split, counts in PUBLISHED[key].items()}
    contents = read_dataset(path, image_root=image_root, split_by=split_by)
    counts = raw_counts(path, split_by, contents.records)
    report = CheckReport(str(path), key, against,
                         contents.image_root.describe() if contents.image_root else "images: -")
    missing_by_split = defaultdict(int)
    if images:
        by_folder = defaultdict(lambda: [0, 0, None])
        split_of = defaultdict(set)
        for r in contents.records:
            split_of[r.image].add(r.split)
        for image, splits in sorted(split_of.items()):
            folder = by_folder[str(Path(image).parent)]
            folder[1] += 1
            if not Path(image).is_file():
                folder[0] += 1
                folder[2] = folder[2] or Path(image).name
                for s in splits:
                    missing_by_split[s] += 1
        report.missing_by_folder = {f: tuple(v) for f, v in by_folder.items() if v[0]}
    expected = expected or {}
    for split in [*contents.splits, *(s for s in expected if s not in contents.splits)]:
        found = counts.get(split)
        if found is None:
            report.notes.append(f"split {split!r}: {against}, not in this copy")
            continue
        report.splits.append(SplitCheck(split, found, expected.get(split, {}),
                                        missing_by_split[split] if images else None))
    return report
