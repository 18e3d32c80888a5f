"""Transforms: box-keeping crop, flip round trip, letterbox inverse, whole-word left/right, hue
rotation only where no colour is named."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lads.datasets.transforms import (
    Augment,
    box_to_original,
    eval_transform,
    hflip,
    names_colour,
    rotate_hue,
    swap_left_right,
    train_transform,
)

FAST = settings(max_examples=40, deadline=None)


@st.composite
def image_and_box(draw, max_side=160):
    w = draw(st.integers(8, max_side))
    h = draw(st.integers(8, max_side))
    x1 = draw(st.floats(0, w - 2))
    y1 = draw(st.floats(0, h - 2))
    x2 = draw(st.floats(x1 + 1, w))
    y2 = draw(st.floats(y1 + 1, h))
    pixels = np.random.default_rng(draw(st.integers(0, 99))).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels), (x1, y1, x2, y2)


def to_xyxy(box_cxcywh, size):
    cx, cy, w, h = (box_cxcywh * size).tolist()
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


@FAST
@given(image_and_box(), st.integers(16, 96), st.integers(0, 2**32 - 1))
def test_train_crop_and_resize_keep_the_box_whole(sample, size, seed):
    img, box = sample
    augment = Augment(crop=1.0, flip=0.0, jitter=0.0)
    image, mask, target, _, meta = train_transform(img, box, "x", size, augment, random.Random(seed))
    x1, y1, x2, y2 = to_xyxy(target, size)
    cw, ch = meta["content"]
    eps = 1e-3
    assert -eps <= x1 and -eps <= y1 and x2 <= cw + eps and y2 <= ch + eps  # inside the image
    (sx, sy), (x0, y0) = meta["scale"], meta["crop"]
    expected = ((box[0] - x0) * sx, (box[1] - y0) * sy, (box[2] - x0) * sx, (box[3] - y0) * sy)
    assert np.allclose((x1, y1, x2, y2), expected, atol=1e-3)  # whole: shifted and scaled only
    assert image.shape == (3, size, size) and mask.shape == (size, size)
    assert not mask[:ch, :cw].any() and mask.sum() == size * size - cw * ch
    assert torch.allclose(box_to_original(target, meta), torch.tensor(box), atol=1e-2)


WORDS = st.sampled_from(["left", "Left", "RIGHT", "leftmost", "Rightmost", "bright", "leftover",
                         "the", "cup,", "copyright", "left-hand", "right.", "(left)"])


@FAST
@given(image_and_box(max_side=40), st.lists(WORDS, max_size=8).map(" ".join))
def test_hflip_twice_is_identity(sample, text):
    img, box = sample
    once = hflip(img, box, text)
    twice = hflip(*once)
    assert np.array_equal(np.asarray(twice[0]), np.asarray(img))
    assert np.allclose(twice[1], box) and twice[2] == text
    assert np.allclose((once[1][0], once[1][2]), (img.width - box[2], img.width - box[0]))


@FAST
@given(image_and_box(max_side=400), st.integers(16, 128))
def test_letterbox_then_box_to_original(sample, size):
    img, box = sample
    image, mask, target, _, meta = eval_transform(img, box, "x", size)
    assert image.shape == (3, size, size) and mask.dtype == torch.bool
    assert max(meta["content"]) == size and not mask[0, 0]
    assert torch.allclose(box_to_original(target, meta), torch.tensor(box), atol=1.0)


def test_flipped_train_box_maps_back():
    img = Image.new("RGB", (120, 80))
    box = (10.0, 20.0, 40.0, 60.0)
    augment = Augment(crop=1.0, flip=1.0, jitter=0.3)
    _, _, target, text, meta = train_transform(img, box, "the left one", 64, augment, random.Random(1))
    assert meta["flipped"] and text == "the right one"
    assert torch.allclose(box_to_original(target, meta), torch.tensor(box), atol=1e-3)
    batch = torch.stack([target, target])
    assert box_to_original(batch, meta).shape == (2, 4)


def test_padding_is_bottom_right_and_normalised():
    img = Image.new("RGB", (100, 50), (124, 116, 104))  # about the ImageNet mean
    image, mask, _, _, meta = eval_transform(img, (0, 0, 10, 10), "x", 64)
    assert meta["content"] == (64, 32)
    assert not mask[:32].any() and mask[32:].all()
    assert image[:, :32].abs().max() < 0.02 and (image[:, 32:] == 0).all()


@pytest.mark.parametrize("text, expected", [
    ("the left cup", "the right cup"),
    ("right guy", "left guy"),
    ("bright light", "bright light"),
    ("leftover copyright", "leftover copyright"),
    ("leftmost dog", "rightmost dog"),
    ("the RIGHTMOST one, on the Left.", "the LEFTMOST one, on the Right."),
    ("left-hand side", "right-hand side"),
])
def test_swap_left_right(text, expected):
    assert swap_left_right(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("the red circle", True), ("Reddish one on the left", True), ("the GREY car", True), ("gray shirt", True),
    ("the star", False), ("the leftmost object", False), ("a bred horse", False), ("credit card", False),
])
def test_names_colour(text, expected):
    assert names_colour(text) is expected


def patches() -> Image.Image:
    """Pure red, green and blue patches on mid gray."""
    pixels = np.full((8, 24, 3), 128, dtype=np.uint8)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        pixels[2:6, 8 * i + 2:8 * i + 6] = colour
    return Image.fromarray(pixels)


def test_rotate_hue_turns_colours_keeps_gray_and_value():
    img = patches()
    before = np.asarray(img).astype(int)
    third = np.asarray(rotate_hue(img, 1 / 3)).astype(int)
    # a third of the circle: red -> green -> blue -> red, each within PIL's 8-bit hue steps
    for i, channel in enumerate([1, 2, 0]):
        pixel = third[3, 8 * i + 3]
        assert pixel[channel] == 255 and np.all(np.delete(pixel, channel) <= 8), pixel
    assert np.array_equal(third[0], before[0])  # gray has no hue
    assert np.array_equal(third.max(-1), before.max(-1))  # HSV's value kept
    assert np.array_equal(np.asarray(rotate_hue(img, 1.0)), np.asarray(rotate_hue(img, 0.0)))


def test_train_hue_only_where_no_colour_is_named():
    img, box = patches(), (2.0, 2.0, 6.0, 6.0)
    augment = Augment(crop=0.0, flip=0.0, jitter=0.0, hue=1.0)

    def out(text, aug):
        return train_transform(img, box, text, 24, aug, random.Random(3))

    plain = Augment(crop=0.0, flip=0.0, jitter=0.0)
    named, named_plain = out("the red square", augment), out("the red square", plain)
    assert torch.equal(named[0], named_plain[0])  # a colour is named: the image is not turned
    free, free_plain = out("the square", augment), out("the square", plain)
    assert torch.equal(free[2], free_plain[2])  # the box is untouched
    assert not torch.equal(free[0], free_plain[0])  # colour-free: the hue turns
