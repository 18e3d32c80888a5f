"""Datasets: readers (REFER, TransVG split files, Flickr30k Entities, Visual Genome, JSONL), the
synthetic benchmark, record tables and mixtures for pre-training, transforms.

``load_records(path, split)`` reads any supported dataset into a list of ``Record`` and a
``Counter`` of the records it skipped, by reason. The format is found from the path:

- a folder with ``refs(<splitBy>).p`` and ``instances.json`` (or the pickle itself): REFER;
- a ``<ds>_<split>.pth`` file, or a folder ``<ds>/`` holding such files: TransVG / ReSC;
- a folder with ``Annotations/`` and ``Sentences/``: Flickr30k Entities;
- a folder with ``region_descriptions.json``: Visual Genome;
- a ``.jsonl`` file: our JSONL format (``docs/data.md``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lads.datasets import flickr30k, jsonl, refer, transvg, visual_genome
from lads.datasets.image_roots import ImageRoot
from lads.datasets.records import Collector, Record
from lads.errors import LadsError

__all__ = ["Contents", "Record", "known_splits", "load_records", "read_dataset"]

SPLIT_ORDER = ("train", "val", "test", "testA", "testB", "testC")
log = logging.getLogger(__name__)


@dataclass
class Contents:
    """What a reader found: the wanted records, every split the data has, what was skipped."""

    splits: list[str]
    records: list[Record]
    skipped: Counter  # (split or None, reason) -> count
    examples: dict[str, str]  # reason -> the first record skipped for it
    image_root: ImageRoot | None = None  # where image names were resolved, and how it was chosen

    def skipped_by_reason(self) -> Counter:
        counts = Counter()
        for (_, reason), n in self.skipped.items():
            counts[reason] += n
        return counts


def _sorted_splits(splits) -> list[str]:
    rank = {s: i for i, s in enumerate(SPLIT_ORDER)}
    return sorted(splits, key=lambda s: (rank.get(s, len(rank)), s))


def detect_reader(path: Path, split_by):
    """``(reader, folder or file, extra keyword arguments)`` for the dataset at ``path``."""
    if not path.exists():
        raise LadsError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".jsonl":
            return jsonl.read, path, {}
        if path.suffix == ".pth":
            return transvg.read, path, {}
        if m := refer.REFS_PATTERN.match(path.name):
            return refer.read, path.parent, {"split_by": split_by or m.group(1)}
    elif refer.split_bys(path):
        return refer.read, path, {"split_by": split_by}
    elif any(path.glob(f"{path.name}_*.pth")):
        return transvg.read, path, {}
    elif flickr30k.is_flickr30k(path):
        return flickr30k.read, path, {}
    elif visual_genome.is_visual_genome(path):
        return visual_genome.read, path, {}
    raise LadsError(
        f"{path}: no dataset found; expected a folder with refs(<splitBy>).p and "
        "instances.json (REFER), a <ds>_<split>.pth file or a <ds>/ folder of them (TransVG), "
        "a folder with Annotations/ and Sentences/ (Flickr30k Entities), a folder with "
        "region_descriptions.json (Visual Genome), or a .jsonl file"
    )


def read_dataset(path, splits=None, *, image_root=None, split_by=None, strict=False, sink=None) -> Contents:
    """Every record of ``splits`` (None: all) at ``path``; see ``load_records``. ``sink``
    receives the records instead of a list (e.g. a ``TableBuilder``)."""
    path = Path(path)
    reader, where, kwargs = detect_reader(path, split_by)
    collector = Collector(None if splits is None else set(splits), strict, sink)
    found = reader(where, collector, image_root=image_root, **kwargs)
    missing = [s for s in (splits or []) if s not in found]
    if missing:
        raise LadsError(
            f"{path}: no split {', '.join(map(repr, missing))}; "
            f"this dataset has {', '.join(_sorted_splits(found)) or 'no records'}"
        )
    if splits != [] and not collector.records and collector.skipped:
        first = next(iter(collector.examples.values()))
        raise LadsError(f"{path}: no usable records; e.g. {first}")
    return Contents(_sorted_splits(found), collector.records, collector.skipped, collector.examples,
                    collector.image_root)


def load_records(path, split, *, image_root=None, split_by=None, strict=False):
    """``(records, skipped)`` of one split (None: every split) of the dataset at ``path``.

    ``skipped`` counts the records left out, by reason (empty expression, bad box, ...);
    ``strict=True`` raises ``LadsError`` on the first one instead. ``image_root`` is where
    image paths are resolved (default: ``images/`` in the dataset folder for REFER and
    TransVG, ``flickr30k-images/`` for Flickr30k Entities, the folder itself for Visual Genome,
    the file's folder for JSONL); ``split_by`` picks a REFER ``refs(<splitBy>).p``
    (default: unc, then umd, berkeley, google). An unknown split raises ``LadsError``
    naming the splits the data has.
    """
    contents = read_dataset(path, None if split is None else [split], image_root=image_root,
                            split_by=split_by, strict=strict)
    skipped = contents.skipped_by_reason()
    for reason, n in skipped.items():
        log.warning("%s: skipped %d record(s): %s (first: %s)", path, n, reason,
                    contents.examples[reason])
    return contents.records, skipped


def known_splits(path, *, split_by=None) -> list[str]:
    """The splits the dataset at ``path`` has, in the usual order (train, val, test, ...)."""
    return read_dataset(path, [], split_by=split_by).splits
