"""The synthetic REC benchmark, checked from its files alone.

The resolver below is written from the grammar in ``lads/datasets/synth.py``'s docstring, not
from its code: it parses each expression and evaluates it on the annotations.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lads.datasets import synth
from lads.errors import LadsError

N_IMAGES = 300


class RefuseGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def load(out: Path):
    refs = RefuseGlobals(io.BytesIO((out / "refs(unc).p").read_bytes())).load()
    instances = json.loads((out / "instances.json").read_text())
    objects = {}
    for ann in sorted(instances["annotations"], key=lambda a: a["id"]):
        objects.setdefault(ann["image_id"], []).append(ann)
    images = {im["id"]: im for im in instances["images"]}
    return refs, instances, images, objects


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = synth.generate(tmp_path_factory.mktemp("synth") / "data", seed=3, images=N_IMAGES, progress=False)
    return out, *load(out)


# ----------------------------------------------------------------------------- the resolver

SIZES = ("small", "large", "huge")
SUPERLATIVES = {"leftmost": "left", "rightmost": "right", "topmost": "top", "bottommost": "bottom"}
ORDINALS = {"second": 2, "third": 3}
RELATION = re.compile(r"^the (.+?) (left of|right of|above|below) (the .+)$")  # the first relation
FLIPPED = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}


def centre(ann):
    x, y, w, h = ann["bbox"]
    return x + w / 2, y + h / 2


def before(a, b, direction):
    """How far ``a`` is ahead of ``b`` when counting from ``direction`` (pixels)."""
    (ax, ay), (bx, by) = centre(a), centre(b)
    return {"left": bx - ax, "right": ax - bx, "top": by - ay, "bottom": ay - by}[direction]


def parse_phrase(words, colours, shapes):
    """``[size] [colour] noun`` -> (size, colour, shape); a bare "object" or a modified "shape"."""
    *modifiers, noun = words
    size = modifiers.pop(0) if modifiers and modifiers[0] in SIZES else None
    colour = modifiers.pop(0) if modifiers and modifiers[0] in colours else None
    assert not modifiers, words
    if noun in shapes:
        return size, colour, noun
    assert noun == ("shape" if size or colour else "object"), words
    return size, colour, None


def matching(objects, phrase):
    size, colour, shape = phrase
    return [
        o for o in objects
        if all(want in (None, o["attributes"][key])
               for key, want in (("size", size), ("colour", colour), ("shape", shape)))
    ]


def resolve(sent, objects, colours, shapes, margin):
    """(form, objects the expression fits): one object when it is unambiguous.

    "A left of B": B's centre is at least ``margin`` px right of A's; no other candidate may be
    to B's left by less than that. "The k-th X from the left": k - 1 X are at least ``margin``
    px to its left, all other X at least ``margin`` px to its right.
    """
    words = sent.split()
    assert words[0] == "the", sent
    relational = RELATION.match(sent)
    if relational:
        first, relation, second = relational.groups()
        chained = RELATION.match(second)  # the anchor named by a relation of its own
        if chained:
            anchors = resolve(second, objects, colours, shapes, margin)[1]
        else:
            anchors = matching(objects, parse_phrase(second.split()[1:], colours, shapes))
        form = "chained" if chained else "relational"
        if len(anchors) != 1:
            return form, []
        direction = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}[relation]
        candidates = [o for o in matching(objects, parse_phrase(first.split(), colours, shapes)) if o is not anchors[0]]
        if any(0 < before(o, anchors[0], direction) < margin for o in candidates):
            return form, []  # too close to call
        return form, [o for o in candidates if before(o, anchors[0], direction) >= margin]
    if words[1] in SUPERLATIVES:
        direction, rank, phrase = SUPERLATIVES[words[1]], 1, words[2:]
    elif words[1] in ORDINALS:
        assert words[-3:-1] == ["from", "the"], sent
        direction, rank, phrase = words[-1], ORDINALS[words[1]], words[2:-3]
    else:
        phrase = parse_phrase(words[1:], colours, shapes)
        form = "category" if phrase[:2] == (None, None) else "colour" if phrase[2] is None else "attribute"
        return form, matching(objects, phrase)
    group = matching(objects, parse_phrase(phrase, colours, shapes))
    fits = []
    for o in group:
        ahead = [p for p in group if p is not o and before(p, o, direction) >= margin]
        behind = [p for p in group if p is not o and before(o, p, direction) >= margin]
        if len(ahead) == rank - 1 and len(ahead) + len(behind) == len(group) - 1:
            fits.append(o)
    return "spatial", fits


def every_sentence(refs, objects):
    for ref in refs:
        scene = objects[ref["image_id"]]
        target = next(o for o in scene if o["id"] == ref["ann_id"])
        for sentence in ref["sentences"]:
            yield ref, sentence, scene, target


# ----------------------------------------------------------------------------- tests


def test_every_expression_refers_to_exactly_its_object(dataset):
    _, refs, instances, _, objects = dataset
    info = instances["info"]
    shapes = [c["name"] for c in instances["categories"]]
    checked = Counter()
    for ref, sentence, scene, target in every_sentence(refs, objects):
        form, fits = resolve(sentence["sent"], scene, info["colours"], shapes, info["margin"])
        assert form == sentence["expr_type"], sentence
        assert fits == [target], (sentence["sent"], ref["image_id"])
        assert sentence["tokens"] == sentence["sent"].split()
        checked[form] += 1
    assert set(checked) == set(synth.EXPR_TYPES)


def test_relations_single_out_one_of_several(dataset):
    """The first noun phrase of a relational or chained expression matches at least two objects,
    so the relation is needed; a chained one's anchor phrase does too."""
    _, refs, instances, _, objects = dataset
    colours, shapes = instances["info"]["colours"], [c["name"] for c in instances["categories"]]
    seen = Counter()
    for _, sentence, scene, _ in every_sentence(refs, objects):
        if sentence["expr_type"] in ("relational", "chained"):
            first, _, second = RELATION.match(sentence["sent"]).groups()
            assert len(matching(scene, parse_phrase(first.split(), colours, shapes))) >= 2, sentence
            if sentence["expr_type"] == "chained":
                anchor = RELATION.match(second).group(1)
                assert len(matching(scene, parse_phrase(anchor.split(), colours, shapes))) >= 2, sentence
            seen[sentence["expr_type"]] += 1
    assert min(seen["relational"], seen["chained"]) > 20


def test_attribute_expressions_use_the_fewest_attributes(dataset):
    _, refs, _, _, objects = dataset
    for _, sentence, scene, target in every_sentence(refs, objects):
        if sentence["expr_type"] == "attribute":
            a = target["attributes"]
            assert len(matching(scene, (None, None, a["shape"]))) >= 2
            if sentence["sent"] == f"the {a['size']} {a['colour']} {a['shape']}":
                assert len(matching(scene, (a["size"], None, a["shape"]))) >= 2
                assert len(matching(scene, (None, a["colour"], a["shape"]))) >= 2


def test_expressions_survive_a_horizontal_flip_with_swapped_words(dataset):
    _, refs, instances, images, objects = dataset
    info = instances["info"]
    shapes = [c["name"] for c in instances["categories"]]
    for ref, sentence, scene, target in every_sentence(refs, objects):
        width = images[ref["image_id"]]["width"]
        mirrored = [
            {**o, "bbox": [width - o["bbox"][0] - o["bbox"][2], *o["bbox"][1:]]} for o in scene
        ]
        flipped = " ".join(FLIPPED.get(w, w) for w in sentence["sent"].split())
        _, fits = resolve(flipped, mirrored, info["colours"], shapes, info["margin"])
        assert [o["id"] for o in fits] == [target["id"]], (sentence["sent"], flipped)


def test_split_and_expression_type_proportions(dataset):
    _, refs, instances, _, _ = dataset
    image_splits = Counter({ref["image_id"]: ref["split"] for ref in refs}.values())
    assert sum(image_splits.values()) == len(instances["images"])  # every image has a ref
    normal = sum(image_splits[s] for s in synth.SPLITS)
    assert normal == N_IMAGES
    for split, fraction in synth.SPLITS.items():
        assert abs(image_splits[split] / normal - fraction) < 0.01
    assert image_splits["heldout"] == round(0.1 * N_IMAGES)
    types = Counter(s["expr_type"] for ref in refs for s in ref["sentences"])
    total = sum(types.values())
    assert total > 2 * N_IMAGES
    for expr_type, fraction in synth.EXPR_TYPES.items():
        assert abs(types[expr_type] / total - fraction) < 0.02, types


def test_scene_contents(dataset):
    _, _, instances, _, objects = dataset
    counts = [len(scene) for scene in objects.values()]
    assert min(counts) >= 3 and max(counts) <= 8
    attributes = Counter(tuple(a["attributes"].values()) for a in instances["annotations"])
    assert len({(a["shape"], a["colour"]) for a in (a["attributes"] for a in instances["annotations"])}) == 36
    sizes = Counter(a["attributes"]["size"] for a in instances["annotations"])
    assert set(sizes) == {"small", "large", "huge"}
    huge = Counter(a["image_id"] for a in instances["annotations"] if a["attributes"]["size"] == "huge")
    assert max(huge.values()) == 1  # at most one a scene
    assert abs(len(huge) / len(instances["images"]) - synth.HUGE_PROB) < 0.1
    heights = {im["id"]: im["height"] for im in instances["images"]}
    ratios = [max(a["bbox"][2:]) / heights[a["image_id"]] for a in instances["annotations"]
              if a["attributes"]["size"] == "huge"]
    assert 0.35 < float(np.median(ratios)) < 0.75  # about half the image's height
    assert len(attributes) >= 60
    assert len({(im["width"], im["height"]) for im in instances["images"]}) > 20


def test_heldout_pairs_never_in_train_and_always_referred_in_heldout(dataset):
    _, refs, instances, _, objects = dataset
    heldout = {tuple(p) for p in instances["info"]["heldout_pairs"]}
    assert len(heldout) == 4
    split_of = {ref["image_id"]: ref["split"] for ref in refs}
    pair = lambda ann: (ann["attributes"]["colour"], ann["attributes"]["shape"])  # noqa: E731
    for image_id, scene in objects.items():
        if split_of[image_id] == "train":
            assert not heldout & {pair(o) for o in scene}
    heldout_refs = [ref for ref in refs if ref["split"] == "heldout"]
    assert heldout_refs
    for ref in heldout_refs:
        target = next(o for o in objects[ref["image_id"]] if o["id"] == ref["ann_id"])
        assert pair(target) in heldout


def test_same_seed_same_bytes_other_seed_other_files(tmp_path):
    def files(out):
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first = files(synth.generate(tmp_path / "a", seed=7, images=20, progress=False))
    second = files(synth.generate(tmp_path / "b", seed=7, images=20, progress=False))
    other = files(synth.generate(tmp_path / "c", seed=8, images=20, progress=False))
    assert first == second
    assert len(first) == 20 + 2 + 2
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def test_refs_are_plain_data(dataset):
    out, refs, *_ = dataset

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return type(value) in (str, int, float)

    assert plain(refs)
    with pytest.raises(pickle.UnpicklingError):
        RefuseGlobals(io.BytesIO(pickle.dumps([Path("x")], protocol=2))).load()
    assert (out / "refs(unc).p").read_bytes()[:2] == b"\x80\x02"  # protocol 2
    assert len({r["ref_id"] for r in refs}) == len(refs)
    sent_ids = [s["sent_id"] for r in refs for s in r["sentences"]]
    assert sent_ids == [i for r in refs for i in r["sent_ids"]] and len(set(sent_ids)) == len(sent_ids)


def test_boxes_are_tight_around_the_drawn_pixels(dataset):
    out, _, instances, images, objects = dataset
    colours = instances["info"]["colours"]
    checked = 0
    for image_id, scene in list(objects.items())[:60]:
        image = images[image_id]
        pixels = np.asarray(Image.open(out / "images" / image["file_name"]).convert("RGB")).astype(int)
        assert pixels.shape == (image["height"], image["width"], 3)
        saturated = pixels.max(2) - pixels.min(2) > 80  # objects are saturated, backgrounds are not
        for ann in scene:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= image["width"] and y + h <= image["height"]
            x0, y0, x1, y1 = int(x) - 3, int(y) - 3, int(x + w) + 3, int(y + h) + 3
            if any(o is not ann and o["bbox"][0] < x1 and x0 < o["bbox"][0] + o["bbox"][2]
                   and o["bbox"][1] < y1 and y0 < o["bbox"][1] + o["bbox"][3] for o in scene):
                continue  # another object is near: its pixels would be counted too
            window = np.zeros_like(saturated)
            window[max(y0, 0) : y1, max(x0, 0) : x1] = True
            ys, xs = np.nonzero(saturated & window)
            assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == [x, y, w, h]
            assert len(xs) == ann["area"]
            assert (pixels[ys, xs] == colours[ann["attributes"]["colour"]]).all()
            checked += 1
    assert checked > 100


@pytest.mark.parametrize(
    "arguments, named",
    [
        ({"images": 0}, "--images"),
        ({"seed": -1}, "--seed"),
        ({"size": 16}, "--size"),
        ({"heldout_fraction": 2.0}, "--heldout-fraction"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, arguments, named):
    with pytest.raises(LadsError, match=named):
        synth.generate(tmp_path / "out", progress=False, **{"images": 5, **arguments})


def test_existing_dataset_needs_force_and_command_line_writes(tmp_path, capsys):
    from lads.cli import main

    args = ["data", "synth", "--out", str(tmp_path / "d"), "--seed", "1", "--images", "3"]
    assert main(args) == 0
    assert len(list((tmp_path / "d" / "images").iterdir())) == 3  # round(0.1 * 3) = 0 heldout
    capsys.readouterr()
    assert main(args) == 2
    assert re.search("^lads data synth: error: --out .*--force", capsys.readouterr().err, re.M)
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--images", "1", "--force"]) == 0
    assert len(list((tmp_path / "d" / "images").iterdir())) == 1
