"""The synthetic REC benchmark: scenes of coloured shapes, written in the REFER format.

``generate(out_dir, seed=0, images=1000)`` (or ``lads data synth --out DIR``) writes::

    DIR/images/synth_000001.png ...
    DIR/refs(unc).p        pickle (protocol 2) of a list of refs, plain Python types only
    DIR/instances.json     COCO-style images, annotations (one per object), categories, info

Scenes. 3 to 8 objects on a low-saturation textured background (gradient, stripes or blocky
noise). An object is one of ``SHAPES`` (the COCO category) in one of ``COLOURS``, ``small`` or
``large``; with ``HUGE_PROB`` a scene's first object (after any required one) is ``huge``
instead (``SIZES``: about half the image's height). Colours are flat and saturated, backgrounds
never are. Objects overlap now and then, but each keeps at least ``MIN_VISIBLE`` of its pixels.
A box is the tight box of the object's visible pixels, COCO ``[x, y, w, h]``. Each annotation
carries ``attributes: {shape, colour, size}``.

Expressions (``sent`` and ``tokens``, tagged ``expr_type``), in the proportions
``EXPR_TYPES``. An object's position is its box centre; ``MARGIN`` is in pixels.

- ``category``: "the star", only when the shape is unique in the scene.
- ``colour``: "the red shape", only when the colour is unique in the scene.
- ``attribute``: "the small red circle", only when the shape alone is not unique: the shape
  with the fewest of {size, colour} that make it unique (one chosen at random when either
  alone does), written size first.
- ``spatial``: "the leftmost object", "the topmost red shape", "the second square from the
  right". The group is the objects matching the noun phrase (at least two); every other
  member's centre is at least ``MARGIN`` away from the target's along the axis, so the rank
  (1 to 3) is unambiguous.
- ``relational``: "the circle left of the green square". The anchor is named as in
  ``category``/``attribute`` (unique). "A left of B" means ``B.cx - A.cx >= MARGIN``; "right
  of", "above" (smaller y) and "below" likewise. Of the objects matching the first noun phrase
  (at least two in the scene) other than the anchor, exactly one, the target, is in the
  relation, and none is in the band ``0 < displacement < MARGIN``.
- ``chained``: "the circle left of the square above the star": a ``relational`` expression whose
  anchor is named by a ``relational`` expression of its own (so the anchor's shape is not unique).
  Read it from the right: the anchor is the one object that "the square above the star" fits,
  and the target is then found as in ``relational``.

Words are whole-word mirror pairs under a horizontal flip: left/right, leftmost/rightmost.

Splits by image: ``SPLITS`` of the ``images`` normal images, plus ``heldout_fraction`` as many
extra ``heldout`` images. ``HELDOUT_PAIRS`` colour-shape pairs, drawn from the seed, never occur
in normal images; a heldout image has one or two objects with such a pair and refers only to
them. Everything is drawn from ``numpy.random.default_rng`` seeded by ``seed``: the same
arguments give byte-identical files.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from lads.errors import LadsError

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {
    "red": (210, 35, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 215, 45),
    "purple": (145, 60, 195),
    "orange": (245, 130, 25),
}
SIZES = {"small": (14, 18), "large": (26, 34), "huge": (50, 66)}  # drawing square's side at size 128, px
HUGE_PROB = 0.3  # chance that a scene has one huge object; the others are small or large
EXPR_TYPES = {"category": 0.15, "colour": 0.1, "attribute": 0.2, "spatial": 0.2, "relational": 0.2, "chained": 0.15}
SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}
HELDOUT_PAIRS = 4
MARGIN = 6.0  # px between box centres for spatial order and relations
OBJECTS = (3, 8)
OVERLAP_PROB = 0.25  # chance that an object may overlap the ones drawn before it
MIN_VISIBLE = 0.75
REFS_PER_IMAGE = (2, 3)
SENTENCES_PER_REF = (1, 2)
PLACEMENT_TRIES = 40
REFS_FILE = "refs(unc).p"
INSTANCES_FILE = "instances.json"
VERSION = 2  # 2: huge objects, colour and chained expressions


def _star(points=5, inner=0.42):
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return tuple(zip((radii * np.cos(angles)).tolist(), (radii * np.sin(angles)).tolist()))


# Outlines in [-1, 1]^2, y down; the circle is the unit disc.
OUTLINES = {
    "circle": None,
    "square": ((-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)),
    "triangle": ((0.0, -0.95), (1.0, 0.8), (-1.0, 0.8)),
    "star": _star(),
    "diamond": ((0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)),
    "cross": (
        (-0.32, -0.95), (0.32, -0.95), (0.32, -0.32), (0.95, -0.32), (0.95, 0.32), (0.32, 0.32),
        (0.32, 0.95), (-0.32, 0.95), (-0.32, 0.32), (-0.95, 0.32), (-0.95, -0.32), (-0.32, -0.32),
    ),
}


# ----------------------------------------------------------------------------- scenes


@dataclass
class SceneObject:
    """One drawn object, as annotated."""

    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]  # x, y, w, h of the visible pixels
    area: int  # visible pixels

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2


@lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean mask of ``shape`` drawn in a ``side`` px square, cropped to its pixels."""
    t = (np.arange(side) + 0.5) / side * 2 - 1  # pixel centres
    x, y = np.meshgrid(t, t)
    outline = OUTLINES[shape]
    if outline is None:
        mask = x**2 + y**2 <= 1
    else:  # even-odd rule
        mask = np.zeros((side, side), bool)
        for (x1, y1), (x2, y2) in zip(outline, outline[1:] + outline[:1]):
            if y1 != y2:
                crosses = (y1 > y) != (y2 > y)
                mask ^= crosses & (x < x1 + (y - y1) * (x2 - x1) / (y2 - y1))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _background(rng, width: int, height: int) -> np.ndarray:
    """A muted texture: every pixel's channels differ by less than 50 (objects: over 100)."""
    grey = rng.uniform(95, 185)
    first = grey + rng.uniform(-15, 15, 3)
    second = np.clip(grey + rng.uniform(-50, 50), 70, 210) + rng.uniform(-15, 15, 3)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    along = xs * np.cos(angle) + ys * np.sin(angle)
    kind = rng.integers(3)
    if kind == 0:  # gradient
        mix = (along - along.min()) / np.ptp(along)
    elif kind == 1:  # stripes
        mix = 0.5 + 0.5 * np.sin(along * 2 * np.pi / rng.uniform(5, 14))
    else:  # blocky noise
        cell = int(rng.integers(4, 10))
        coarse = rng.random((height // cell + 1, width // cell + 1))
        mix = np.repeat(np.repeat(coarse, cell, 0), cell, 1)[:height, :width]
    pixels = first + mix[..., None] * (second - first) + rng.uniform(-8, 8, (height, width, 3))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _place(rng, owner, mask, keep_clear, visible, areas) -> tuple[int, int] | None:
    """A top-left corner for ``mask`` that keeps every drawn object visible enough, or None.

    The mask's box stays 2 px clear of the boxes ``keep_clear``.
    """
    height, width = owner.shape
    mh, mw = mask.shape
    if mh > height or mw > width:
        return None
    for _ in range(PLACEMENT_TRIES):
        x, y = int(rng.integers(0, width - mw + 1)), int(rng.integers(0, height - mh + 1))
        if any(
            x < bx + bw + 2 and bx < x + mw + 2 and y < by + bh + 2 and by < y + mh + 2
            for bx, by, bw, bh in keep_clear
        ):
            continue
        below = owner[y : y + mh, x : x + mw][mask]
        covered = np.bincount(below[below >= 0], minlength=len(visible))
        if all(v - c >= MIN_VISIBLE * a for v, c, a in zip(visible, covered, areas)):
            return x, y
    return None


def make_scene(rng, width: int, height: int, scale: float, pairs, required=()):
    """Draw a scene; return ``(pixels, objects)`` or None if it could not be laid out.

    ``required`` colour-shape pairs are drawn first and must all be placed; the rest of the
    3 to 8 objects take random pairs from ``pairs``.
    """
    count = max(int(rng.integers(OBJECTS[0], OBJECTS[1] + 1)), len(required))
    specs = list(required) + [pairs[i] for i in rng.integers(len(pairs), size=count - len(required))]
    owner = np.full((height, width), -1, np.int16)
    kept, placed_boxes, visible, areas = [], [], [], []
    huge = len(required) if rng.random() < HUGE_PROB else -1
    for index, (colour, shape) in enumerate(specs):
        size = "huge" if index == huge else str(rng.choice(["small", "large"]))
        low, high = SIZES[size]
        mask = shape_mask(shape, round(rng.integers(low, high + 1) * scale))
        may_overlap = rng.random() < OVERLAP_PROB  # objects of one colour never touch
        keep_clear = [b for b, (c, _, _) in zip(placed_boxes, kept) if c == colour or not may_overlap]
        corner = _place(rng, owner, mask, keep_clear, visible, areas)
        if corner is None:
            if index < len(required):
                return None
            continue
        x, y = corner
        region = owner[y : y + mask.shape[0], x : x + mask.shape[1]]
        below = region[mask]
        for i, c in enumerate(np.bincount(below[below >= 0], minlength=len(visible))):
            visible[i] -= int(c)
        region[mask] = len(kept)
        kept.append((colour, shape, size))
        placed_boxes.append((x, y, mask.shape[1], mask.shape[0]))
        visible.append(int(mask.sum()))
        areas.append(int(mask.sum()))
    if len(kept) < OBJECTS[0]:
        return None
    pixels = _background(rng, width, height)
    palette = np.array([COLOURS[colour] for colour, _, _ in kept], np.uint8)
    drawn = owner >= 0
    pixels[drawn] = palette[owner[drawn]]
    objects = []
    for index, (colour, shape, size) in enumerate(kept):
        ys, xs = np.nonzero(owner == index)
        box = (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))
        objects.append(SceneObject(shape, colour, size, box, int(xs.size)))
    return pixels, objects


# ----------------------------------------------------------------------------- expressions

# A noun phrase is (size, colour, shape), None where unsaid.
DIRECTIONS = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}  # axis, sign
SUPERLATIVES = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}
ORDINALS = {2: "second", 3: "third"}
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}


def _matches(obj: SceneObject, phrase) -> bool:
    size, colour, shape = phrase
    return size in (None, obj.size) and colour in (None, obj.colour) and shape in (None, obj.shape)


def _words(phrase) -> str:
    size, colour, shape = phrase
    modifiers = [w for w in (size, colour) if w]
    return " ".join(modifiers + [shape or ("shape" if modifiers else "object")])


def _count(objects, phrase) -> int:
    return sum(_matches(o, phrase) for o in objects)


def _unique_names(objects, obj) -> list:
    """The noun phrases naming ``obj`` uniquely with its shape and the fewest attributes."""
    for phrases in (
        [(None, None, obj.shape)],
        [(obj.size, None, obj.shape), (None, obj.colour, obj.shape)],
        [(obj.size, obj.colour, obj.shape)],
    ):
        unique = [p for p in phrases if _count(objects, p) == 1]
        if unique:
            return unique
    return []


def category_expressions(objects, obj) -> list[str]:
    return ["the " + obj.shape] if _count(objects, (None, None, obj.shape)) == 1 else []


def colour_expressions(objects, obj) -> list[str]:
    phrase = (None, obj.colour, None)
    return ["the " + _words(phrase)] if _count(objects, phrase) == 1 else []


def attribute_expressions(objects, obj) -> list[str]:
    names = _unique_names(objects, obj)
    return [] if names == [(None, None, obj.shape)] else ["the " + _words(p) for p in names]


def spatial_expressions(objects, obj) -> list[str]:
    found = []
    for phrase in ((None, None, None), (None, obj.colour, None), (None, None, obj.shape),
                   (None, obj.colour, obj.shape)):
        others = [o for o in objects if o is not obj and _matches(o, phrase)]
        if not others:
            continue
        for direction, (axis, sign) in DIRECTIONS.items():
            key = sign * obj.centre[axis]
            offsets = [sign * o.centre[axis] - key for o in others]
            if any(abs(d) < MARGIN for d in offsets):
                continue
            rank = 1 + sum(d < 0 for d in offsets)
            if rank == 1:
                found.append(f"the {SUPERLATIVES[direction]} {_words(phrase)}")
            elif rank in ORDINALS:
                found.append(f"the {ORDINALS[rank]} {_words(phrase)} from the {direction}")
    return found


def relational_expressions(objects, obj) -> list[str]:
    return _related(objects, obj, lambda anchor: ["the " + _words(a) for a in _unique_names(objects, anchor)])


def chained_expressions(objects, obj) -> list[str]:
    return _related(objects, obj, lambda anchor: relational_expressions(objects, anchor))


def _related(objects, obj, anchor_names) -> list[str]:
    """"the <phrase> <relation> <anchor name>" for every anchor and relation that single out ``obj``
    among the other objects matching the phrase (``relational``'s rule); ``anchor_names(anchor)``
    gives the unique names of an anchor."""
    found = []
    phrases = [p for p in ((None, None, obj.shape), (None, obj.colour, obj.shape)) if _count(objects, p) >= 2]
    for anchor in objects:
        if anchor is obj:
            continue
        fits = []  # (relation, phrase) pairs that single out obj from this anchor
        for relation, (axis, sign) in RELATIONS.items():
            for phrase in phrases:
                offsets = {
                    id(o): sign * (o.centre[axis] - anchor.centre[axis])
                    for o in objects
                    if o is not anchor and _matches(o, phrase)
                }
                inside = [k for k, d in offsets.items() if d >= MARGIN]
                if inside == [id(obj)] and not any(0 < d < MARGIN for d in offsets.values()):
                    fits.append((relation, phrase))
        if fits:  # the anchor's names only then: a chained anchor's cost a search of their own
            names = anchor_names(anchor)
            found += [f"the {_words(phrase)} {relation} {name}" for relation, phrase in fits for name in names]
    return found


EXPRESSIONS = {
    "category": category_expressions,
    "colour": colour_expressions,
    "attribute": attribute_expressions,
    "spatial": spatial_expressions,
    "relational": relational_expressions,
    "chained": chained_expressions,
}


class TypeQuota:
    """Keeps the expression types of a generated set in the proportions ``EXPR_TYPES``."""

    def __init__(self):
        self.counts = dict.fromkeys(EXPR_TYPES, 0)

    def order(self) -> list[str]:
        """Types by decreasing deficit: the first one that a scene allows is taken."""
        total = sum(self.counts.values()) + 1
        return sorted(EXPR_TYPES, key=lambda t: self.counts[t] - EXPR_TYPES[t] * total)


def describe(rng, objects, targets, refs: int, quota: TypeQuota) -> list[tuple[int, list]]:
    """Up to ``refs`` referred objects among ``targets`` (indices): ``[(index, [(type, sent)])]``."""
    remaining = [targets[i] for i in rng.permutation(len(targets))]
    described = []
    while remaining and len(described) < refs:
        choice = _first_expression(rng, objects, remaining, quota, used=())
        if choice is None:
            break
        index, expr_type, sent = choice
        remaining.remove(index)
        sentences = [(expr_type, sent)]
        for _ in range(int(rng.integers(SENTENCES_PER_REF[0], SENTENCES_PER_REF[1] + 1)) - 1):
            more = _first_expression(rng, objects, [index], quota, used={s for _, s in sentences})
            if more:
                sentences.append(more[1:])
        described.append((index, sentences))
    return described


def _first_expression(rng, objects, candidates, quota, used):
    for expr_type in quota.order():
        for index in candidates:
            options = [s for s in EXPRESSIONS[expr_type](objects, objects[index]) if s not in used]
            if options:
                quota.counts[expr_type] += 1
                return index, expr_type, options[int(rng.integers(len(options)))]
    return None


# ----------------------------------------------------------------------------- the dataset


def generate(
    out_dir,
    seed: int = 0,
    images: int = 1000,
    size: int = 128,
    heldout_fraction: float = 0.1,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write the benchmark to ``out_dir``: ``images`` train/val/test images plus heldout ones.

    ``size`` is the nominal long side: widths are 0.875-1.25 and heights 0.75-1 times it.
    """
    out = _check_arguments(out_dir, seed, images, size, heldout_fraction, force)
    rng = np.random.default_rng([seed, 0])
    heldout = _heldout_pairs(rng)
    pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in heldout]
    splits = _split_names(rng, images) + ["heldout"] * round(heldout_fraction * images)
    scale = size / 128
    quota = TypeQuota()
    records = _Records()
    (out / "images").mkdir(parents=True)
    for index, split in enumerate(tqdm(splits, desc="synth", unit="img", disable=not progress)):
        image_rng = np.random.default_rng([seed, 1, index])
        width = int(round(size * image_rng.uniform(0.875, 1.25)))
        height = int(round(size * image_rng.uniform(0.75, 1.0)))
        while True:
            required = []
            if split == "heldout":
                required = [heldout[i] for i in image_rng.permutation(len(heldout))[: image_rng.integers(1, 3)]]
            scene = make_scene(image_rng, width, height, scale, pairs, required)
            if scene is None:
                continue
            pixels, objects = scene
            targets = list(range(len(required) if required else len(objects)))
            refs = int(image_rng.integers(REFS_PER_IMAGE[0], REFS_PER_IMAGE[1] + 1))
            described = describe(image_rng, objects, targets, refs, quota)
            if described:
                break
        file_name = f"synth_{index + 1:06d}.png"
        Image.fromarray(pixels).save(out / "images" / file_name, format="PNG", compress_level=6)
        records.add(index + 1, file_name, split, pixels.shape, objects, described)
    info = {
        "description": "lads synthetic REC benchmark",
        "generator": "lads.datasets.synth",
        "version": VERSION,
        "seed": seed,
        "images": images,
        "heldout_images": splits.count("heldout"),
        "size": size,
        "heldout_pairs": [list(p) for p in heldout],
        "splits": SPLITS,
        "expr_types": EXPR_TYPES,
        "margin": MARGIN,
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "sizes": SIZES,
        "huge_prob": HUGE_PROB,
    }
    instances = {
        "images": records.images,
        "annotations": records.annotations,
        "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)],
        "info": info,
    }
    (out / INSTANCES_FILE).write_text(json.dumps(instances, sort_keys=True, separators=(",", ":")))
    with open(out / REFS_FILE, "wb") as f:
        pickle.dump(records.refs, f, protocol=2)
    return out


def _check_arguments(out_dir, seed, images, size, heldout_fraction, force) -> Path:
    if not isinstance(images, int) or images < 1:
        raise LadsError(f"--images must be a whole number of at least 1, got {images!r}")
    if not isinstance(seed, int) or seed < 0:
        raise LadsError(f"--seed must be a whole number of at least 0, got {seed!r}")
    if not isinstance(size, int) or not 64 <= size <= 1024:
        raise LadsError(f"--size must be a whole number from 64 to 1024, got {size!r}")
    if not 0 <= heldout_fraction <= 1:
        raise LadsError(f"--heldout-fraction must be from 0 to 1, got {heldout_fraction!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LadsError(f"--out {out} is a file, not a folder")
    existing = [out / name for name in ("images", REFS_FILE, INSTANCES_FILE) if (out / name).exists()]
    if existing and not force:
        raise LadsError(f"--out {out} already holds a dataset ({existing[0].name}); pass --force to overwrite it")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return out


def _heldout_pairs(rng) -> list[tuple[str, str]]:
    """``HELDOUT_PAIRS`` colour-shape pairs, no two sharing a colour or a shape."""
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    return sorted(zip(colours[:HELDOUT_PAIRS], shapes[:HELDOUT_PAIRS]))


def _split_names(rng, images: int) -> list[str]:
    """The split of each normal image: exact ``SPLITS`` counts (rounded), in random order."""
    counts = {name: round(fraction * images) for name, fraction in SPLITS.items() if name != "train"}
    names = ["train"] * (images - sum(counts.values()))
    for name, count in counts.items():
        names += [name] * count
    return [names[i] for i in rng.permutation(images)]


class _Records:
    """The images, annotations and refs of the dataset, with their running ids."""

    def __init__(self):
        self.images, self.annotations, self.refs = [], [], []
        self.sentences = 0

    def add(self, image_id, file_name, split, shape, objects, described) -> None:
        height, width = shape[:2]
        self.images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        ann_ids = list(range(len(self.annotations) + 1, len(self.annotations) + 1 + len(objects)))
        for ann_id, obj in zip(ann_ids, objects):
            self.annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": SHAPES.index(obj.shape) + 1,
                    "bbox": list(obj.box),
                    "area": float(obj.area),
                    "iscrowd": 0,
                    "attributes": {"shape": obj.shape, "colour": obj.colour, "size": obj.size},
                }
            )
        for index, sentences in described:
            sent_ids = list(range(self.sentences, self.sentences + len(sentences)))
            self.sentences += len(sentences)
            self.refs.append(
                {
                    "ref_id": len(self.refs),
                    "ann_id": ann_ids[index],
                    "image_id": image_id,
                    "category_id": SHAPES.index(objects[index].shape) + 1,
                    "split": split,
                    "file_name": file_name,
                    "sentences": [
                        {"sent": sent, "raw": sent, "sent_id": sent_id, "tokens": sent.split(), "expr_type": expr_type}
                        for sent_id, (expr_type, sent) in zip(sent_ids, sentences)
                    ],
                    "sent_ids": sent_ids,
                }
            )


# ----------------------------------------------------------------------------- command line
