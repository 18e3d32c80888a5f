"""Flickr30k Entities (Plummer et al., ICCV 2015), as distributed.

A dataset folder holds::

    Annotations/<image id>.xml   PASCAL VOC: <size>, then <object>s, each with one or more
                                 <name> (entity ids) and either a <bndbox> (1-based, inclusive
                                 pixel indices) or <nobndbox>1 / <scene>1 (no box)
    Sentences/<image id>.txt     five captions, phrases marked [/EN#<entity id>/<type>[/<type>] words]
    train.txt  val.txt  test.txt image ids, one a line
    flickr30k-images/<id>.jpg    the images (or anywhere, given ``image_root``)

One record per marked phrase whose entity has at least one box. An entity drawn with several
boxes (a group: "two men") refers to their union, the convention of the ReSC/TransVG split
files. Pixel ``i`` (1-based) covers ``[i - 1, i)``, so ``xmin..xmax`` becomes
``(xmin - 1, xmax)``. Skipped and counted: ``notvisual`` phrases, phrases of scene entities or
of entities without a box (by design: strict mode counts them too), markup that does not parse
(per line), and every phrase of an image whose XML does not parse.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from lads.datasets.image_roots import find_image_root
from lads.datasets.records import Collector, Record
from lads.errors import LadsError

SPLITS = ("train", "val", "test")
PHRASE = re.compile(r"\[/EN#(\d+)((?:/[^\s/\]]+)+)\s+([^\[\]]*)\]")


def is_flickr30k(folder: Path) -> bool:
    return (folder / "Annotations").is_dir() and (folder / "Sentences").is_dir()


def parse_sentence(line: str) -> list[tuple[int, list[str], str]]:
    """``(entity id, types, phrase)`` of every marked phrase of a caption line;
    ``ValueError`` if the brackets do not all form ``[/EN#<id>/<type> words]``."""
    phrases = [(int(m.group(1)), m.group(2).strip("/").split("/"), m.group(3).strip())
               for m in PHRASE.finditer(line)]
    if line.count("[") != len(phrases) or line.count("]") != len(phrases):
        raise ValueError("malformed markup (expected [/EN#<id>/<type> words])")
    return phrases


def parse_annotation(path: Path) -> tuple[tuple[int, int], dict[int, list], set[int]]:
    """``((width, height), {entity: [0-based boxes]}, scene entities)`` of one XML file;
    ``ValueError`` naming what is wrong."""
    try:
        root = ET.parse(path).getroot()
        size = (int(root.findtext("size/width")), int(root.findtext("size/height")))
        boxes, scene = {}, set()
        for obj in root.iter("object"):
            entities = [int(name.text) for name in obj.findall("name")]
            box = obj.find("bndbox")
            if box is not None:
                x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                for e in entities:
                    boxes.setdefault(e, []).append((x1 - 1, y1 - 1, x2, y2))
            elif (obj.findtext("scene") or "0").strip() not in ("", "0"):
                scene.update(entities)
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"unreadable annotation ({type(e).__name__}: {e})") from None
    except (TypeError, ValueError) as e:  # a missing or non-numeric size or coordinate
        raise ValueError(f"malformed annotation ({type(e).__name__}: {e})") from None
    return size, boxes, scene


def union(boxes: list) -> tuple[float, float, float, float]:
    xs1, ys1, xs2, ys2 = zip(*boxes)
    return (min(xs1), min(ys1), max(xs2), max(ys2))


def read_split_lists(folder: Path) -> dict[str, list[str]]:
    """``{split: image ids}`` from the split lists present."""
    lists = {s: (folder / f"{s}.txt").read_text().split() for s in SPLITS if (folder / f"{s}.txt").is_file()}
    if not lists:
        raise LadsError(f"{folder}: a Flickr30k Entities folder needs train.txt, val.txt or test.txt")
    return lists


def read(folder: Path, collector: Collector, *, image_root=None) -> set[str]:
    """Add the records of the wanted splits to ``collector``; return every split there is."""
    lists = read_split_lists(folder)
    first = next((f"{ids[0]}.jpg" for ids in lists.values() if ids), None)
    collector.image_root = find_image_root(image_root, folder / "flickr30k-images", folder, ("flickr30k",), first)
    image_root = collector.image_root.path
    for split, ids in lists.items():
        if collector.wants(split):
            for image_id in ids:
                _add_image(folder, image_id, split, image_root, collector)
    return set(lists)


def _add_image(folder, image_id, split, image_root, collector):
    sentences_file = folder / "Sentences" / f"{image_id}.txt"
    try:
        lines = sentences_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return collector.skip(split, str(sentences_file), f"unreadable sentences ({type(e).__name__})")
    try:
        annotation = parse_annotation(folder / "Annotations" / f"{image_id}.xml")
    except ValueError as e:
        annotation = e
    for number, line in enumerate(lines, 1):
        where = f"{sentences_file}:{number}"
        try:
            phrases = parse_sentence(line)
        except ValueError as e:
            collector.skip(split, where, str(e))
            continue
        for k, (entity, types, phrase) in enumerate(phrases, 1):
            _add_phrase(annotation, image_id, split, image_root, entity, types, phrase,
                        f"{where} phrase {k}", collector)


def _add_phrase(annotation, image_id, split, image_root, entity, types, phrase, where, collector):
    if isinstance(annotation, ValueError):
        return collector.skip(split, where, str(annotation))
    size, boxes, scene = annotation
    if "notvisual" in types:
        return collector.skip(split, where, "notvisual phrase", error=False)
    if entity not in boxes:
        reason = "scene entity, no box" if entity in scene else "entity without a box"
        return collector.skip(split, where, reason, error=False)
    record = Record(
        image=str(image_root / f"{image_id}.jpg"),
        expression=phrase,
        box=union(boxes[entity]),
        dataset="flickr30k",
        split=split,
        ref_id=entity,
        image_id=int(image_id) if image_id.isdigit() else None,
        expr_type="/".join(types),
        source=where,
    )
    collector.add(record, size)
