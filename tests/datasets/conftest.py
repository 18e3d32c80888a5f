"""Fixtures for the data tests: a Python-2-style pickle writer, small datasets on disk."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from PIL import Image


def write_py2_pickle(obj) -> bytes:
    """``obj`` pickled the way Python 2's cPickle wrote REFER's refs(...).p: protocol 2,
    every ``str`` as a byte string (SHORT_BINSTRING / BINSTRING), memo puts after each
    string and container. No GLOBAL opcode anywhere."""
    out = bytearray(b"\x80\x02")
    memo = [0]

    def put():
        out.extend(b"q" + bytes([memo[0]]) if memo[0] < 256 else b"r" + struct.pack("<I", memo[0]))
        memo[0] += 1

    def write(x):
        if x is None:
            out.extend(b"N")
        elif isinstance(x, bool):
            out.extend(b"\x88" if x else b"\x89")
        elif isinstance(x, int):
            if 0 <= x < 256:
                out.extend(b"K" + bytes([x]))
            elif 0 <= x < 65536:
                out.extend(b"M" + struct.pack("<H", x))
            else:
                out.extend(b"J" + struct.pack("<i", x))
        elif isinstance(x, float):
            out.extend(b"G" + struct.pack(">d", x))
        elif isinstance(x, str):
            data = x.encode("utf-8")
            head = b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<I", len(data))
            out.extend(head + data)
            put()
        elif isinstance(x, list):
            out.extend(b"]")
            put()
            if x:
                out.extend(b"(")
                for item in x:
                    write(item)
                out.extend(b"e")
        elif isinstance(x, dict):
            out.extend(b"}")
            put()
            if x:
                out.extend(b"(")
                for key, value in x.items():
                    write(key)
                    write(value)
                out.extend(b"u")
        else:
            raise TypeError(type(x))

    write(obj)
    return bytes(out + b".")


def save_image(path, size=(64, 48), mode="RGB"):
    """A noise image of ``size`` (w, h) in ``mode`` at ``path``."""
    w, h = size
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def sentence(sent_id, text, **extra):
    return {"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text, **extra}


def ref(ref_id, ann_id, image_id, split, sentences):
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
            "sent_ids": [s["sent_id"] for s in sentences], "category_id": 1,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "sentences": sentences}


def coco_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


# 3 images of 64x48; boxes are COCO [x, y, w, h].
REFER_ANNOTATIONS = {
    10: (1, [4.0, 6.0, 20.0, 10.0]),
    11: (1, [30.0, 8.0, 33.0, 39.5]),  # right edge at 63, bottom at 47.5: inside
    12: (2, [0.0, 0.0, 64.0, 48.0]),
    13: (3, [10.0, 10.0, 0.0, 5.0]),  # zero width: bad
    14: (3, [50.0, 40.0, 30.0, 30.0]),  # far outside a 64x48 image: bad
    15: (3, [62.0, 46.0, 3.0, 3.0]),  # 1 px past the corner: clipped to [62, 46, 64, 48]
}
REFER_REFS = [
    ref(1, 10, 1, "train", [sentence(100, "the left cup"), sentence(101, "café au lait")]),
    ref(2, 11, 1, "train", [sentence(102, "the right cup", expr_type="spatial")]),
    ref(3, 12, 2, "val", [sentence(103, "whole picture"), sentence(104, "   ")]),
    ref(4, 15, 3, "testA", [sentence(105, "corner thing")]),
    ref(5, 13, 3, "testB", [sentence(106, "a flat box")]),
    ref(6, 14, 3, "testB", [sentence(107, "an outside box")]),
    ref(7, 10, 1, "testB", [sentence(108, "the left cup again")]),
]


@pytest.fixture
def refer_dir(tmp_path):
    """A ``refcoco`` folder: refs(unc).p (Python-2 style), refs(google).p, instances.json,
    images/. Good sentences per split: train 3, val 1, testA 1, testB 1; bad: 3 in val/testB."""
    folder = tmp_path / "refcoco"
    folder.mkdir()
    (folder / "refs(unc).p").write_bytes(write_py2_pickle(REFER_REFS))
    (folder / "refs(google).p").write_bytes(write_py2_pickle(REFER_REFS[:2]))
    images = [{"id": i, "file_name": coco_name(i), "width": 64, "height": 48}
              for i in (1, 2, 3)]
    annotations = [{"id": a, "image_id": img, "bbox": box, "category_id": 1}
                   for a, (img, box) in REFER_ANNOTATIONS.items()]
    (folder / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "cup"}]}))
    for image in images:
        save_image(folder / "images" / image["file_name"], (64, 48))
    return folder


def refer_toolkit(root, splits=(("train", 1), ("train", 2), ("val", 3), ("testA", 4), ("testB", 5))):
    """The REFER toolkit's layout under ``root``: ``data/refcoco/refs(unc).p``,
    ``data/refcoco/instances.json``, images in ``data/images/mscoco/images/train2014/``."""
    folder = root / "data" / "refcoco"
    folder.mkdir(parents=True)
    refs = [{"ref_id": i, "ann_id": 10 + i, "image_id": image, "split": split, "category_id": 1,
             "sentences": [sentence(100 + 2 * i, f"thing {i}"), sentence(101 + 2 * i, f"the thing {i}")]}
            for i, (split, image) in enumerate(splits)]
    (folder / "refs(unc).p").write_bytes(write_py2_pickle(refs))
    images = sorted({image for _, image in splits})
    (folder / "instances.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": coco_name(i), "width": 64, "height": 48} for i in images],
        "annotations": [{"id": r["ref_id"] + 10, "image_id": r["image_id"], "bbox": [2, 2, 30, 20], "category_id": 1}
                        for r in refs]}))
    for i in images:
        save_image(root / "data" / "images" / "mscoco" / "images" / "train2014" / coco_name(i), (64, 48))
    return folder


@pytest.fixture
def py2_pickle():
    return write_py2_pickle


@pytest.fixture(scope="session")
def tokenizer():
    from lads.models.text import load_tokenizer

    return load_tokenizer("minilm-l6")
