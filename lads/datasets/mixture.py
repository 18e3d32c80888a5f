"""Pre-training mixtures: several datasets sampled by weight, leak-free (docs/data.md, "Mixtures").

Each source (``data.mixture``) is read once into a ``RecordTable`` under ``data.index_dir`` and
memory-mapped from then on. An epoch has as many samples as the sources have expressions; each
source fills a quota of it in proportion to its weight (rounded down or up at random, so that
it is exact on average), drawing its records in a seeded random order, cycled when its quota
exceeds its size; the whole epoch is then shuffled. Everything is seeded by (seed, epoch), so a
resumed run draws the same samples.

Leak-free: the images of the evaluation splits (``EVAL_SPLITS``) of the datasets in
``data.exclude`` leave every source, compared by COCO id — RefCOCO/+/g and the COCO-derived
TransVG files name COCO images, Visual Genome gives each image's ``coco_id``, Flickr30k and
ReferIt images are not COCO images. ``data.exclude`` unset: the REFER and TransVG sources of the
mixture itself are the evaluation sets (RefCOCOg's train split holds RefCOCO val images).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from lads.datasets.table import FORMAT, META, Records, RecordTable, TableBuilder
from lads.errors import LadsError
from lads.util import dist

EVAL_SPLITS = ("val", "test", "testA", "testB", "testC")


class Mixture(Records):
    """The sources' records as one sequence (source ``k``'s records follow those of sources
    before it) and the weighted order of each epoch."""

    def __init__(self, tables: list[RecordTable], rows: list[np.ndarray], shares, names: list[str]):
        self.tables, self.rows, self.names = tables, rows, names
        self.starts = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        self.shares = np.asarray(shares, np.float64) / np.sum(shares)
        self.report: list[dict] = []  # per source, from load_mixture: kept, removed, skipped

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i):
        k = int(self.source_of(i))
        return self.tables[k][int(self.rows[k][i - self.starts[k]])]

    def source_of(self, indices):
        """The source number of each global index."""
        return np.searchsorted(self.starts, indices, side="right") - 1

    def quotas(self, n: int, u: float) -> np.ndarray:
        """Samples of each source among ``n``: ``n × share`` rounded down or up, by systematic
        rounding at offset ``u`` in [0, 1): they sum to ``n``, and for ``u`` uniform each is
        ``n × share`` on average, so a long draw matches the weights exactly."""
        edges = np.floor(np.concatenate([[0.0], np.cumsum(n * self.shares)]) + u)
        edges[-1] = n + np.floor(u)  # no float error at the end
        return np.diff(edges).astype(np.int64)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The global indices of ``epoch``'s samples, in order."""
        rng = np.random.default_rng([seed, epoch])
        picks = []
        for k, count in enumerate(self.quotas(len(self), rng.random())):
            size = len(self.rows[k])
            if count and size:
                cycles = [rng.permutation(size) for _ in range(-(-count // size))]
                picks.append(self.starts[k] + np.concatenate(cycles)[:count])
        order = np.concatenate(picks)
        return order[rng.permutation(len(order))]


# ----------------------------------------------------------------------------- record tables


def table_folder(source, index_dir) -> Path:
    """Where the table of ``source`` (a ``MixtureSource``) lives: named after the dataset and a
    hash of what determines its records."""
    root = source.image_root and str(Path(source.image_root).resolve())
    key = json.dumps([FORMAT, str(Path(source.path).resolve()), root, source.split_by])
    return Path(index_dir) / f"{Path(source.path).name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def build_table(path, *, image_root=None, split_by=None) -> RecordTable:
    """Every split of the dataset at ``path`` as a ``RecordTable``, with what was skipped."""
    from lads.datasets import read_dataset

    builder = TableBuilder()
    contents = read_dataset(path, None, image_root=image_root, split_by=split_by, sink=builder)
    meta = {"splits": contents.splits, "examples": contents.examples,
            "skipped": [[split, reason, n] for (split, reason), n in contents.skipped.items()],
            "source": {"path": str(path), "image_root": image_root, "split_by": split_by},
            "images": contents.image_root.describe() if contents.image_root else None}
    return builder.table(origin=str(path), meta=meta)


def source_table(source, index_dir) -> RecordTable:
    """The table of ``source``, built by the first process of each machine if it is not there
    yet (the others wait), then memory-mapped."""
    folder = table_folder(source, index_dir)
    if not (folder / META).exists() and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"{source.path}: building its record table in {folder} (once)", flush=True)
        build_table(source.path, image_root=source.image_root, split_by=source.split_by).save(folder)
    dist.barrier()
    return RecordTable.open(folder)


# ----------------------------------------------------------------------------- leak-free


def default_exclude(sources) -> list:
    """The evaluation sets of a mixture whose ``exclude`` is unset: its REFER and TransVG
    sources (a TransVG split file stands for its folder)."""
    from lads.config import EvalSet
    from lads.datasets import detect_reader, refer, transvg

    sets = []
    for s in sources:
        reader, where, kwargs = detect_reader(Path(s.path), s.split_by)
        if reader is refer.read:
            sets.append(EvalSet(str(where), kwargs["split_by"]))
        elif reader is transvg.read:
            sets.append(EvalSet(str(where.parent if where.is_file() else where)))
    return sets


def eval_coco_ids(sets) -> np.ndarray:
    """The COCO ids of the images of the evaluation splits of ``sets`` (``EvalSet``s), sorted."""
    from lads.datasets import read_dataset

    ids = set()
    for s in sets:
        contents = read_dataset(s.path, None, split_by=s.split_by)
        ids.update(r.coco_id for r in contents.records if r.split in EVAL_SPLITS and r.coco_id is not None)
    return np.array(sorted(ids), np.int64)


# ----------------------------------------------------------------------------- loading


def _shares(sources, sizes) -> list[float]:
    weights = [s.weight for s in sources]
    if all(w is None for w in weights):
        return sizes
    if any(w is None for w in weights):
        raise LadsError("data.mixture: give every source a weight, or none (then each weighs its size)")
    bad = [i for i, w in enumerate(weights) if w < 0]
    if bad or sum(weights) <= 0:
        raise LadsError(f"data.mixture[{bad[0] if bad else 0}].weight: weights must be >= 0 with a positive sum")
    return weights


def load_mixture(data, say=print) -> Mixture:
    """The training records of ``data.mixture`` (a ``DataConfig``), leak-free. Its ``report``
    gives, per source, the expressions kept, those removed as evaluation images and those
    skipped while reading; the main process says it, a line a source."""
    if not data.mixture:
        raise LadsError("data.mixture is empty")
    tables = [source_table(s, data.index_dir) for s in data.mixture]
    sets = data.exclude if data.exclude is not None else default_exclude(data.mixture)
    excluded = eval_coco_ids(sets)
    rows, report = [], []
    for s, table in zip(data.mixture, tables):
        mine = table.rows(s.split)
        leaks = np.isin(table.record_coco_ids(mine), excluded)
        mine = mine[~leaks].astype(np.int32 if len(table) < 2**31 else np.int64)
        if not len(mine):
            raise LadsError(f"{s.path} [{s.split}]: no expression left after removing evaluation images")
        rows.append(mine)
        report.append({"source": f"{s.path} [{s.split}]", "expressions": len(mine), "removed": int(leaks.sum()),
                       "skipped": dict(table.skipped()), "images": table.meta.get("images")})
    mixture = Mixture(tables, rows, _shares(data.mixture, [len(r) for r in rows]), [r["source"] for r in report])
    mixture.report = report
    if dist.is_main():
        against = ", ".join(e.path + (f" ({e.split_by})" if e.split_by else "") for e in sets) or "nothing"
        say(f"mixture of {len(tables)} sources, {len(mixture):,} samples an epoch; evaluation images "
            f"({len(excluded):,} COCO ids) of: {against}")
        for r, share in zip(report, mixture.shares):
            skipped = ", ".join(f"{n:,} {why}" for why, n in r["skipped"].items())
            say(f"  {r['source']}: {r['expressions']:,} expressions, share {100 * share:.1f} %; removed "
                f"{r['removed']:,} of evaluation images; skipped {sum(r['skipped'].values()):,} while reading"
                + (f" ({skipped})" if skipped else "") + (f"; {r['images']}" if r["images"] else ""))
    return mixture
