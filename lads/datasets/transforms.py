"""Image, box and text transforms, ending in an ``image_size`` square with a pad mask.

Evaluation: resize the long side to ``image_size``, letterbox-pad (image at the top left, pad
at the bottom and right), ImageNet normalisation. Training adds, in this order, a random crop
that keeps the referred box whole, a multi-scale resize (the long side drawn from
``Augment.scales``), a horizontal flip that swaps ``left``/``right`` as whole words in the
expression, a hue rotation for expressions that name no colour, and colour jitter.

Boxes are ``(x1, y1, x2, y2)`` pixels on the way in; the output box is ``(cx, cy, w, h)``
normalised by ``image_size``. ``meta`` records each geometric step so that
``box_to_original`` maps a predicted box back to the original image.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance

from lads.util import image as letterbox
from lads.util.image import resize_long_side, start_meta


@dataclass
class Augment:
    """Training augmentation settings."""

    scales: tuple[float, ...] = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)  # long side / size
    crop: float = 0.5  # probability of a random crop (it always keeps the box whole)
    crop_min: float = 0.6  # smallest crop side, as a fraction of the image side
    flip: float = 0.5  # probability of a horizontal flip
    jitter: float = 0.4  # brightness, contrast, saturation factors in [1 - j, 1 + j]
    hue: float = 0.0  # probability of a random hue rotation, for expressions naming no colour


_LEFT_RIGHT = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)


def _swap_word(match: re.Match) -> str:
    word = match.group(0)
    swapped = ("right" if match.group(1).lower() == "left" else "left") + (match.group(2) or "")
    if word.isupper():
        return swapped.upper()
    return swapped.capitalize() if word[0].isupper() else swapped


def swap_left_right(text: str) -> str:
    """``left <-> right`` and ``leftmost <-> rightmost`` as whole words ("bright" stays)."""
    return _LEFT_RIGHT.sub(_swap_word, text)


def hflip(img: Image.Image, box, text: str):
    """Mirror the image, the box and the words ``left``/``right`` in the expression."""
    x1, y1, x2, y2 = box
    flipped = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return flipped, (img.width - x2, y1, img.width - x1, y2), swap_left_right(text)


_COLOUR = re.compile(
    r"\b(red|green|blue|yellow|orange|purple|pink|brown|black|white|gr[ae]y|violet|beige|tan|maroon|"
    r"navy|teal|turquoise|cyan|magenta|gold|golden|silver|blond|blonde|khaki|olive)(dish|ish)?\b",
    re.IGNORECASE,
)


def names_colour(text: str) -> bool:
    """Whether the expression names a colour (a whole word: "red", "reddish"; "bred" does not)."""
    return _COLOUR.search(text) is not None


def rotate_hue(img: Image.Image, turn: float) -> Image.Image:
    """The image with every pixel's hue turned by ``turn`` of a full circle (HSV, PIL's 8-bit
    hue), saturation and value kept: shapes keep their outline and contrast, not their colour."""
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(256 * turn)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def crop_keeping_box(img: Image.Image, box, min_side: float, rng) -> tuple[int, int, int, int]:
    """A random crop region ``(x0, y0, x1, y1)`` (integers) that contains ``box`` whole.

    Each axis is drawn on its own: a side length at least the box's extent and ``min_side``
    of the image, then an origin between "box touches the far edge" and "box touches the
    near edge", clamped to the image.
    """
    region = []
    for lo, hi, side in ((box[0], box[2], img.width), (box[1], box[3], img.height)):
        lo, hi = max(0, math.floor(lo)), min(side, math.ceil(hi))
        length = rng.randint(min(side, max(hi - lo, math.ceil(min_side * side))), side)
        start = rng.randint(max(0, hi - length), min(lo, side - length))
        region.append((start, start + length))
    (x0, x1), (y0, y1) = region
    return x0, y0, x1, y1


def color_jitter(img: Image.Image, strength: float, rng) -> Image.Image:
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(1 - strength, 1 + strength))
    return img


def _resize(img, box, long_side: int, meta: dict):
    """Resize the long side to ``long_side``, scaling ``box`` (if any) along."""
    resized = resize_long_side(img, long_side, meta)
    sx, sy = meta["scale"]
    return resized, None if box is None else (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _output(img, box, text, meta):
    image, mask = map(torch.from_numpy, letterbox.pad_to_square(img, meta["image_size"]))
    target = None
    if box is not None:
        x1, y1, x2, y2 = (v / meta["image_size"] for v in box)
        target = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dtype=torch.float32)
    return image, mask, target, text, meta




def eval_transform(img: Image.Image, box, text: str, size: int):
    """``(image, pixel_mask, box_cxcywh, text, meta)``: letterbox to a ``size`` square.
    ``box`` may be None (inference), and then so is ``box_cxcywh``."""
    meta = start_meta(img, size)
    img, box = _resize(img, box, size, meta)
    return _output(img, box, text, meta)


def train_transform(img: Image.Image, box, text: str, size: int, augment: Augment, rng=random):
    """Like ``eval_transform``, with random crop, scale, flip, hue rotation and colour jitter.

    The hue turns only where the expression names no colour, so the label stays true: "the
    star" in any hue (docs/design.md §5a)."""
    meta = start_meta(img, size)
    if rng.random() < augment.crop:
        x0, y0, x1, y1 = crop_keeping_box(img, box, augment.crop_min, rng)
        img, box = img.crop((x0, y0, x1, y1)), (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
        meta["crop"] = (x0, y0)
    img, box = _resize(img, box, max(1, round(size * rng.choice(augment.scales))), meta)
    if rng.random() < augment.flip:
        img, box, text = hflip(img, box, text)
        meta["flipped"] = True
    if augment.hue and not names_colour(text) and rng.random() < augment.hue:
        img = rotate_hue(img, rng.random())
    if augment.jitter:
        img = color_jitter(img, augment.jitter, rng)
    return _output(img, box, text, meta)


def box_to_original(box, meta) -> torch.Tensor:
    """A ``(cx, cy, w, h)`` box normalised to the padded square -> ``(x1, y1, x2, y2)``
    pixels in the original image, clipped to it (``lads.util.image.box_to_original``)."""
    return torch.from_numpy(letterbox.box_to_original(torch.as_tensor(box, dtype=torch.float32).numpy(), meta))
