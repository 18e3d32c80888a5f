"""Open any image as 8-bit RGB, or raise a ``RecordError`` that names the file and record."""

from __future__ import annotations

from PIL import Image

from lads.datasets.records import RecordError
from lads.util.image import read_rgb


def open_rgb(image, record: str = "") -> Image.Image:
    """The image at a path, upright (EXIF orientation applied), in RGB; a PIL image in RGB."""
    where = f"{record}, image {image}" if record else f"image {image}"
    try:
        return read_rgb(image)
    except FileNotFoundError:
        raise RecordError(where, "image not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RecordError(where, f"unreadable image ({e})") from None
