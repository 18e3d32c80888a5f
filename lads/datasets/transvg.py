"""TransVG / ReSC split files: ``<ds>/<ds>_<split>.pth`` for ds in unc, unc+, gref, gref_umd,
referit, flickr.

Each file is a list of tuples ``(img_file, mask_file_or_seg_id, bbox, phrase, ...)``; the
Flickr30k Entities files (``flickr_train.pth``, ``flickr_val.pth``, ``flickr_test.pth``, part of
TransVG's pre-training data) hold ``(img_file, bbox, phrase)``. The COCO-derived sets give
``bbox`` as ``[x, y, w, h]``, ReferIt and Flickr as ``[x1, y1, x2, y2]``. The files carry no
image sizes and no ids, so boxes are checked against the image when it is opened.
"""

from __future__ import annotations

from pathlib import Path

from lads.datasets.image_roots import find_image_root
from lads.datasets.records import Collector, Record
from lads.errors import LadsError

BOX_FORMATS = {"unc": "xywh", "unc+": "xywh", "gref": "xywh", "gref_umd": "xywh", "referit": "xyxy",
               "flickr": "xyxy"}
COLLECTIONS = {"unc": "coco", "unc+": "coco", "gref": "coco", "gref_umd": "coco", "referit": "saiapr",
               "flickr": "flickr30k"}
FIELDS = {"flickr": ("img_file", "bbox", "phrase")}
DEFAULT_FIELDS = ("img_file", "mask", "bbox", "phrase")  # then more, unused


def dataset_name(path: Path) -> str:
    """``unc`` for ``unc/`` and for ``unc_testA.pth``."""
    ds = path.stem.rsplit("_", 1)[0] if path.is_file() else path.name
    if ds not in BOX_FORMATS:
        raise LadsError(f"{path}: unknown TransVG dataset {ds!r}; known: {', '.join(BOX_FORMATS)}")
    return ds


def split_files(path: Path) -> dict[str, Path]:
    """``{split: file}`` for a split file or a ``<ds>/`` folder of them."""
    ds = dataset_name(path)
    files = [path] if path.is_file() else sorted(path.glob(f"{ds}_*.pth"))
    return {f.stem[len(ds) + 1 :]: f for f in files}


def load_items(path: Path) -> list:
    """The list a split file holds, read with ``torch.load(weights_only=True)``."""
    import pickle

    import torch

    try:
        data = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LadsError(f"{path}: not a readable TransVG split file ({first})") from None
    if not isinstance(data, list):
        raise LadsError(f"{path}: expected a list of tuples, got {type(data).__name__}")
    return data


def read(path: Path, collector: Collector, *, image_root=None) -> set[str]:
    """Add the records of the wanted split files under ``path`` to ``collector``; return
    every split there is. Images default to ``images/`` beside the split files."""
    ds = dataset_name(path)
    files = split_files(path)
    folder = path.parent if path.is_file() else path
    root = None
    fields = FIELDS.get(ds, DEFAULT_FIELDS)
    expected = f"expected ({', '.join(fields)}{'' if ds in FIELDS else ', ...'})"
    for split, file in files.items():
        if not collector.wants(split):
            continue
        items = load_items(file)
        if root is None:
            first = next((str(item[0]) for item in items if isinstance(item, (list, tuple)) and item), None)
            root = find_image_root(image_root, folder / "images", folder, (COLLECTIONS[ds],), first)
        collector.image_root = root
        for i, item in enumerate(items):
            where = f"{file} item {i}"
            if not isinstance(item, (list, tuple)) or len(item) < len(fields):
                collector.skip(split, where, expected)
                continue
            values = dict(zip(fields, item))
            img_file, bbox, phrase = values["img_file"], values["bbox"], values["phrase"]
            record = Record(
                image=str(root.path / str(img_file)),
                expression=phrase.decode("utf-8") if isinstance(phrase, bytes) else phrase,
                box=bbox,
                dataset=ds,
                split=split,
                source=where,
            )
            collector.add(record, None, BOX_FORMATS[ds])
    return set(files)
