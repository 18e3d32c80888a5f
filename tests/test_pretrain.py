"""``lads pretrain``: CenterNet targets by hand, the objects it reads, a run that learns, and
weights that ``model.visual.pretrained`` loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lads.config import load_config
from lads.datasets import refer
from lads.errors import LadsError
from lads.models import build_model
from lads.pretrain import ObjectScenes, centre_loss, centre_targets, pretrain


def test_centre_targets_by_hand():
    # one object centred at (0.30, 0.60) of a 4×4 grid, 0.2 × 0.1 of the square, classes (2, 5)
    objects = [torch.tensor([[0.30, 0.60, 0.2, 0.1, 2, 5]]), torch.zeros(0, 6)]
    heat, box, classes = centre_targets(objects, grid=4, num_heads=2)
    gx, gy, sigma = 1.2, 2.4, 0.2 * 4 / 6 + 0.3
    assert heat[0, 2, 1] == 1 and heat.shape == (2, 4, 4)
    expected = math.exp(-((0.5 - gx) ** 2 + (0.5 - gy) ** 2) / (2 * sigma**2))  # cell (0, 0)
    assert heat[0, 0, 0].item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(box[0, :, 2, 1], torch.tensor([gx - 1, gy - 2, 0.2, 0.1]))
    assert classes[0, :, 2, 1].tolist() == [2, 5]
    assert int((classes != -100).sum()) == 2 and heat[1].abs().sum() == 0 and box[1].abs().sum() == 0


def test_centre_loss_is_small_for_the_targets_themselves():
    objects = [torch.tensor([[0.3, 0.6, 0.2, 0.1, 1, 0], [0.8, 0.2, 0.3, 0.3, 0, 2]])]
    heat, box, classes = centre_targets(objects, grid=8, num_heads=2)
    logit = torch.logit(heat.clamp(1e-4, 1 - 1e-4))
    cls = torch.full((1, 5, 8, 8), -20.0)
    cls[0, 1, 4, 2] = cls[0, 2 + 0, 4, 2] = 20  # object 1: class 1 of 2, class 0 of 3
    cls[0, 0, 1, 6] = cls[0, 2 + 2, 1, 6] = 20  # object 2: class 0 of 2, class 2 of 3
    perfect = torch.cat([logit[:, None], box, cls], 1)
    terms = centre_loss(perfect, heat, box, classes, [2, 3])
    assert terms["box"].item() == 0 and terms["acc_0"].item() == 1 and terms["acc_1"].item() == 1
    wrong = perfect.clone()
    wrong[:, 0] = 0.0
    assert centre_loss(wrong, heat, box, classes, [2, 3])["heatmap"] > terms["heatmap"] + 0.1
    unlabelled = classes.clone()
    unlabelled[:, 1] = -100  # no label of the second head in the batch (all hues turned): no term, no NaN
    loose = centre_loss(wrong, heat, box, unlabelled, [2, 3])
    full = centre_loss(wrong, heat, box, classes, [2, 3])
    assert "acc_1" not in loose and "acc_0" in loose and torch.isfinite(loose["loss"])
    expected = full["loss"] - torch.nn.functional.cross_entropy(wrong[:, 7:10], classes[:, 1], ignore_index=-100)
    torch.testing.assert_close(loose["loss"], expected)


def test_object_scenes_reads_every_object_of_the_training_images(synth_data):
    data = ObjectScenes(synth_data, "train", 64)
    refs = refer.read_pickle(Path(synth_data) / "refs(unc).p")
    train_images = {r["image_id"] for r in refs if r["split"] == "train"}
    annotations = json.loads((Path(synth_data) / "instances.json").read_text())["annotations"]
    assert len(data) == len(train_images)
    assert sum(len(objects) for _, objects in data) == sum(a["image_id"] in train_images for a in annotations)
    assert list(data.heads) == ["category", "colour", "shape", "size"]
    image, objects = data[0]
    assert image.shape == (3, 64, 64) and objects.shape[1] == 4 + 4
    assert bool(((objects[:, :4] > 0) & (objects[:, :4] <= 1)).all())


def test_hue_turned_images_keep_every_target_but_colour(synth_data, tmp_path):
    """``pretrain.hue``: a turned image differs from the plain one in its colours, not its
    brightness pattern; its boxes and classes are kept except the colour, which is not a target."""
    plain, turned = ObjectScenes(synth_data, "train", 64), ObjectScenes(synth_data, "train", 64, hue=1.0)
    colour = 4 + list(plain.heads).index("colour")
    for index in range(3):
        (a, objects_a), (b, objects_b) = plain[index], turned[index]
        assert not torch.allclose(a, b, atol=0.05)
        assert torch.corrcoef(torch.stack([a.mean(0).flatten(), b.mean(0).flatten()]))[0, 1] > 0.5
        assert bool((objects_a[:, colour] >= 0).all()) and bool((objects_b[:, colour] == -100).all())
        others = [i for i in range(objects_a.shape[1]) if i != colour]
        torch.testing.assert_close(objects_a[:, others], objects_b[:, others])
    cfg = load_config("tiny", [f"data.path={synth_data}", "pretrain.hue=1.5", f"pretrain.out={tmp_path}"])
    with pytest.raises(LadsError, match="pretrain.hue must be a probability from 0 to 1, got 1.5"):
        pretrain(cfg, progress=False)


def test_pretraining_learns_and_its_weights_load(synth_data, tmp_path, tiny_text_dir):
    cfg = load_config("tiny", [
        f"data.path={synth_data}", "data.num_workers=0", "model.image_size=64", "model.visual.width=8",
        "pretrain.steps=60", "pretrain.batch_size=4", "pretrain.lr=2e-3", f"pretrain.out={tmp_path / 'pre'}",
        "train.log_every=1",
    ])
    weights = pretrain(cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "pre" / "log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in log[:10]) / 10, sum(r["loss"] for r in log[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    meta = json.loads((tmp_path / "pre" / "meta.json").read_text())
    assert meta["steps"] == 60 and meta["heads"]["colour"][0] == "blue"

    common = [f"model.text.name={tiny_text_dir}", "model.text.num_layers=2", "model.image_size=64",
              "model.visual.width=8", f"model.visual.pretrained={weights}"]
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    for norm in ("batch", "frozen"):
        model = build_model("tiny", [*common, f"model.visual.norm={norm}"])
        state = model.visual_backbone.state_dict()
        torch.testing.assert_close(state["layer3.2.conv2.weight"], saved["layer3.2.conv2.weight"])
        torch.testing.assert_close(state["layer1.0.bn2.running_var"], saved["layer1.0.bn2.running_var"])
    with pytest.raises(LadsError, match="width"):
        build_model("tiny", [*common[:-2], "model.visual.width=16", f"model.visual.pretrained={weights}"])


def test_pretraining_warms_the_learning_rate_up(synth_data, tmp_path):
    cfg = load_config("tiny", [
        f"data.path={synth_data}", "data.num_workers=0", "model.image_size=64", "model.visual.width=8",
        "pretrain.steps=6", "pretrain.batch_size=4", "pretrain.lr=2e-3", "pretrain.warmup_steps=4",
        f"pretrain.out={tmp_path / 'pre'}", "train.log_every=1",
    ])
    pretrain(cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "pre" / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3])


def test_pretraining_bad_data(tmp_path, synth_data):
    with pytest.raises(LadsError, match="needs a REFER folder"):
        ObjectScenes(tmp_path, "train", 64)
    with pytest.raises(LadsError, match="no ref in split 'nope'"):
        ObjectScenes(synth_data, "nope", 64)
