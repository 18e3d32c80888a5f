"""Open any image as 8-bit RGB, or raise a ``RecordError`` that names the file and record."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from lads.datasets.records import RecordError

SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # "I": 16-bit PNGs in Pillow


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


def open_rgb(path: str, record: str = "") -> Image.Image:
    """The image at ``path``, upright (EXIF orientation applied), in RGB."""
    where = f"{record}, image {path}" if record else f"image {path}"
    try:
        with Image.open(path) as img:
            return upright_rgb(img)
    except FileNotFoundError:
        raise RecordError(where, "image not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RecordError(where, f"unreadable image ({e})") from None
