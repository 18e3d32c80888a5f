"""Images in NumPy and Pillow, without torch: any image as 8-bit RGB, and the evaluation
letterbox. The datasets' transforms and the deployment runtime (``lads.deploy``) both read
images through it (docs/design.md §3a).

The letterbox: resize the long side to ``size``, put the image at the top left of a ``size`` square, pad the
bottom and right, normalise with ImageNet's mean and standard deviation. ``meta`` records each
geometric step so that :func:`box_to_original` maps a predicted box back to the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # "I": 16-bit PNGs in Pillow
MEAN = np.array((0.485, 0.456, 0.406), dtype=np.float32)  # ImageNet
STD = np.array((0.229, 0.224, 0.225), dtype=np.float32)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode: 16-bit scaled to 8-bit (not clipped), transparency over white."""
    if img.mode in SIXTEEN_BIT_MODES:
        scaled = np.rint(np.asarray(img, dtype=np.float64) / 257.0)  # 65535 -> 255
        img = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" or "A" in img.mode:  # a palette may carry transparency
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")


def upright_rgb(img: Image.Image) -> Image.Image:
    """An opened image decoded now (a truncated file fails here, not later), upright (EXIF
    orientation applied), in RGB."""
    img.load()
    return to_rgb(ImageOps.exif_transpose(img))


def read_rgb(image) -> Image.Image:
    """A path (opened, decoded now, upright) or a PIL image, in RGB; Pillow's errors pass."""
    if not isinstance(image, (str, Path)):
        return to_rgb(image)
    with Image.open(image) as img:
        return upright_rgb(img)


def resize_long_side(img: Image.Image, long_side: int, meta: dict) -> Image.Image:
    """The image with its long side ``long_side``; ``meta`` records the scale and new size."""
    scale = long_side / max(img.size)
    resized = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
    meta.update(scale=(resized.width / img.width, resized.height / img.height), content=resized.size)
    return resized


def pad_to_square(img: Image.Image, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised float32 (3, size, size) image, top-left aligned, and its bool mask (True =
    padding)."""
    pixels = (np.asarray(img, dtype=np.float32) / np.float32(255.0) - MEAN) / STD
    image = np.zeros((3, size, size), dtype=np.float32)
    image[:, : img.height, : img.width] = pixels.transpose(2, 0, 1)
    mask = np.ones((size, size), dtype=bool)
    mask[: img.height, : img.width] = False
    return image, mask


def start_meta(img: Image.Image, size: int) -> dict:
    return {"size": img.size, "image_size": size, "crop": (0, 0), "flipped": False}


def letterbox(img: Image.Image, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(image, pixel_mask, meta)`` of an RGB image for inference."""
    meta = start_meta(img, size)
    return (*pad_to_square(resize_long_side(img, size, meta), size), meta)


def box_to_original(box, meta: dict) -> np.ndarray:
    """``(cx, cy, w, h)`` boxes (..., 4) normalised to the padded square -> ``(x1, y1, x2, y2)``
    float32 pixels in the original image, clipped to it. Inverts the letterbox and the
    training transforms (crop, flip) that ``meta`` records."""
    cx, cy, w, h = np.moveaxis(np.asarray(box, dtype=np.float32) * np.float32(meta["image_size"]), -1, 0)
    x1, x2 = cx - w / 2, cx + w / 2
    if meta["flipped"]:
        x1, x2 = meta["content"][0] - x2, meta["content"][0] - x1
    (sx, sy), (x0, y0), (width, height) = meta["scale"], meta["crop"], meta["size"]
    y1, y2 = cy - h / 2, cy + h / 2
    out = np.stack([x1 / sx + x0, y1 / sy + y0, x2 / sx + x0, y2 / sy + y0], -1).astype(np.float32)
    return np.minimum(np.maximum(out, 0), np.array([width, height, width, height], dtype=np.float32))
