"""Open any image as 8-bit RGB, or raise a ``RecordError`` that names the file and record."""

from __future__ import annotations

from PIL import Image

from lads.datasets.records import RecordError
from lads.util.image import upright_rgb


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
