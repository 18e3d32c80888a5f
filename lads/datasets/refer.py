"""REFER format (RefCOCO, RefCOCO+, RefCOCOg, ReferIt as ``refclef``; our synthetic benchmark).

A dataset folder holds ``refs(<splitBy>).p`` and ``instances.json``. The pickle is a list of
refs ``{ref_id, ann_id, image_id, split, sentences: [{sent, raw, sent_id, ...}]}``; the COCO
json gives each annotation's ``bbox = [x, y, w, h]`` and each image's ``file_name``, width and
height. The original pickles were written by Python 2 (protocol 2, ``str`` as byte strings).
The pickle comes from the internet, so it is read by an unpickler that refuses every class:
only plain lists, dicts, strings and numbers get through, and nothing is ever called.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

from lads.datasets.image_roots import find_image_root
from lads.datasets.records import Collector, Record
from lads.errors import LadsError

SPLIT_BY_PREFERENCE = ("unc", "umd", "berkeley", "google")  # the default when several exist
REFS_PATTERN = re.compile(r"^refs\((.+)\)\.p$")


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module, name):
        raise LadsError(
            f"{self.path}: refusing to load a pickle that names a class or function "
            f"({module}.{name}); REFER pickles hold only lists, dicts, strings and numbers"
        )


def _text(value):
    """Python 2 byte strings (and dict keys) as ``str``, recursively."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value]
    return value


def read_pickle(path: Path):
    """A data-only pickle, byte strings decoded; ``LadsError`` for anything else."""
    try:
        with open(path, "rb") as f:
            return _text(_DataOnlyUnpickler(f, path).load())
    except LadsError:
        raise
    except Exception as e:  # a damaged pickle fails in many ways; all of them are bad input
        raise LadsError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


def split_bys(folder: Path) -> list[str]:
    """The splitBy variants present in ``folder``, preferred first."""
    found = [m.group(1) for p in folder.iterdir() if (m := REFS_PATTERN.match(p.name))]
    rank = {s: i for i, s in enumerate(SPLIT_BY_PREFERENCE)}
    return sorted(found, key=lambda s: (rank.get(s, len(rank)), s))


def read_instances(path: Path):
    """``(annotations by id, images by id)`` from a COCO ``instances.json``."""
    try:
        data = json.loads(path.read_text())
        return ({a["id"]: a for a in data["annotations"]}, {i["id"]: i for i in data["images"]})
    except FileNotFoundError:
        raise LadsError(f"{path}: missing (a REFER folder needs instances.json)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise LadsError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from None


def read_refs(folder: Path, split_by=None) -> tuple[Path, list[dict]]:
    """``(path, refs)`` of ``folder``'s ``refs(<split_by>).p`` (default: the preferred splitBy
    present), checked to be a list of dicts."""
    available = split_bys(folder)
    split_by = split_by or (available[0] if available else SPLIT_BY_PREFERENCE[0])
    refs_path = folder / f"refs({split_by}).p"
    if split_by not in available:
        raise LadsError(f"{refs_path}: no such file; splitBy choices here: {', '.join(available) or 'none'}")
    refs = read_pickle(refs_path)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise LadsError(f"{refs_path}: expected a list of refs (dicts)")
    return refs_path, refs


def read(folder: Path, collector: Collector, *, split_by=None, image_root=None) -> set[str]:
    """Add the records of ``folder`` to ``collector``; return every split the data has."""
    refs_path, refs = read_refs(folder, split_by)
    splits = {str(r.get("split")) for r in refs}
    wanted = [r for r in refs if collector.wants(str(r.get("split")))]
    if not wanted:
        return splits
    annotations, images = read_instances(folder / "instances.json")
    collector.image_root = image_root = find_image_root(image_root, folder / "images", folder, collections(folder.name),
                                                        _first_file_name(wanted, annotations, images))
    for ref in wanted:
        where = f"{refs_path} ref {ref.get('ref_id')}"
        try:
            _add_ref(ref, annotations, images, image_root.path, folder.name, where, collector)
        except (KeyError, TypeError, AttributeError) as e:
            collector.skip(str(ref.get("split")), where, f"malformed ref ({type(e).__name__}: {e})")
    return splits


def collections(name: str) -> tuple[str, ...]:
    """The image collections a REFER dataset's images may come from: ReferIt (``refclef``) shows
    SAIAPR TC-12 images, the others COCO's; an unknown name may be either."""
    name = name.lower()
    return ("saiapr",) if name == "refclef" else ("coco",) if name.startswith("refcoco") else ("coco", "saiapr")


def _first_file_name(refs, annotations, images) -> str | None:
    for ref in refs:
        ann = annotations.get(ref.get("ann_id")) if isinstance(ref, dict) else None
        image = images.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if isinstance(image, dict) and isinstance(image.get("file_name"), str):
            return image["file_name"]
    return None


def _add_ref(ref, annotations, images, image_root, dataset, where, collector):
    """One record per sentence of ``ref``."""
    split = str(ref["split"])
    ann = annotations.get(ref["ann_id"])
    image = images.get(ann["image_id"]) if ann else None
    if ann is None or image is None:
        what = "annotation" if ann is None else "image"
        return collector.skip(split, where, f"{what} missing from instances.json")
    size = (image["width"], image["height"]) if {"width", "height"} <= image.keys() else None
    for sentence in ref["sentences"]:
        record = Record(
            image=str(image_root / image["file_name"]),
            expression=sentence.get("sent") or sentence.get("raw") or "",
            box=ann["bbox"],
            dataset=dataset,
            split=split,
            ref_id=ref.get("ref_id"),
            ann_id=ann["id"],
            image_id=image["id"],
            sent_id=sentence.get("sent_id"),
            expr_type=sentence.get("expr_type"),
            source=f"{where} sentence {sentence.get('sent_id')}",
        )
        collector.add(record, size, "xywh")
