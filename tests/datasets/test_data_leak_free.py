"""Leak-free starting weights: TransVG's DETR checkpoints load, weights that saw the evaluation
images are refused unless allowed (and then every table says so), ``lads pretrain`` on COCO's own
format leaves the REFER evaluation images out."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import coco_name, refer_toolkit, save_image
from helpers import engine_overrides

from lads.cli import main
from lads.config import load_config
from lads.errors import LadsError
from lads.models import build_model
from lads.models.backbone import VisualBackbone
from lads.models.provenance import eval_overlap, provenance_of
from lads.pretrain import ObjectScenes, pretrain

TINY = ["model.image_size=64", "model.visual.width=8", "model.text.num_layers=2"]


def detr_checkpoint(path, seed=0):
    """A tiny-width checkpoint laid out as DETR's ``main.py`` (and so TransVG's) saves them: the
    model under ``model`` with the ResNet at ``backbone.0.body.``, beside the transformer and the
    heads, and the optimizer, schedule, epoch and arguments (a Namespace). Returns the backbone."""
    torch.manual_seed(seed)
    backbone = VisualBackbone(8, "frozen", False, frozen_stages=1)
    for t in backbone.state_dict().values():
        if t.is_floating_point():  # away from the initialisation, so that a load shows
            t.add_(0.01 * torch.randn_like(t))
    model = {f"backbone.0.body.{k}": v.clone() for k, v in backbone.state_dict().items()}
    model.update({"transformer.encoder.layers.0.linear1.weight": torch.randn(16, 8),
                  "input_proj.weight": torch.randn(8, 32, 1, 1),
                  "query_embed.weight": torch.randn(100, 8), "class_embed.weight": torch.randn(92, 8),
                  "bbox_embed.layers.0.weight": torch.randn(8, 8)})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "lr_scheduler": {"step_size": 40}, "epoch": 59,
                "args": argparse.Namespace(lr=1e-4, backbone="resnet50", dataset_file="coco")}, path)
    return backbone


def test_transvg_detr_checkpoint_loads_through_the_detr_mapping(tmp_path, tiny_text_dir):
    weights = tmp_path / "weights" / "detr-r50-unc.pth"
    reference = detr_checkpoint(weights)
    model = build_model("tiny", [f"model.text.name={tiny_text_dir}", *TINY, f"model.visual.pretrained={weights}"])
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.visual_backbone.state_dict()[key], value)


def test_missing_default_weights_say_where_to_get_them(tmp_path, tiny_text_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LadsError, match=r"no file weights/detr-r50-unc\.pth\. TransVG's DETR-R50 for RefCOCO and "
                                        r"RefCOCO\+.*download detr-r50-unc\.pth from TransVG's checkpoints \(https://"):
        build_model("refcoco", [f"model.text.name={tiny_text_dir}", *TINY])


def train_args(config, text_dir, data, out, weights, *extra):
    args = ["train", "--config", config]
    for o in [*engine_overrides(text_dir, str(data), out), "train.batch_size=2", "train.micro_batch=2",
              "train.max_steps=1", "data.eval_splits=[\"val\"]", f"model.visual.pretrained={weights}", *extra]:
        args += ["--set", o]
    return args


def test_weights_that_saw_the_eval_images_are_refused_unless_allowed(tmp_path, tiny_text_dir, capsys):
    refcoco = refer_toolkit(tmp_path)
    stock = tmp_path / "weights" / "detr-r50-e632da11.pth"  # DETR's COCO weights, by name
    detr_checkpoint(stock)
    assert main(train_args("refcoco", tiny_text_dir, refcoco, tmp_path / "refused", stock)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (f"model.visual.pretrained={stock}: DETR trained on all of COCO 2017 train, which holds every RefCOCO/+/g "
            "val and test image; it saw the val and test images of refcoco/unc") in err
    assert "set model.visual.allow_eval_overlap=true on purpose" in err
    assert not (tmp_path / "refused").exists()

    clean = tmp_path / "weights" / "detr-r50-unc.pth"  # TransVG's, without RefCOCO's val and test images
    detr_checkpoint(clean)
    assert main(train_args("refcoco", tiny_text_dir, refcoco, tmp_path / "clean", clean)) == 0
    assert eval_overlap(str(clean), str(refcoco)) == ("refcoco/unc", None)
    refcocog = tmp_path / "other" / "data" / "refcocog"
    refer_toolkit(tmp_path / "other").rename(refcocog)
    assert "saw the val and test images of refcocog/unc" in eval_overlap(str(clean), str(refcocog))[1]

    capsys.readouterr()
    allowed = tmp_path / "allowed"
    assert main(train_args("refcoco", tiny_text_dir, refcoco, allowed, stock,
                           "model.visual.allow_eval_overlap=true")) == 0
    assert "warning: " in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(allowed / "checkpoint"), str(tmp_path / "clean" / "checkpoint"),
                 "--splits", "val", "--out", str(tmp_path / "table")]) == 0
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0] == ("**Warning: LADS (allowed) started from visual weights that saw evaluation images "
                        "(model.visual.allow_eval_overlap=true): not comparable with leak-free figures.**")
    assert "LADS (clean)" not in table[0]
    card = (allowed / "checkpoint" / "README.md").read_text()
    assert "**Warning: this model started from visual weights that saw evaluation images" in card
    assert main(["analyze", "--checkpoint", str(allowed / "checkpoint"), "--data", str(refcoco), "--split", "train",
                 "--out", str(tmp_path / "analysis")]) == 0
    report = (tmp_path / "analysis" / "report.html").read_text()
    first = report.index("</h1>") + len("</h1>")
    assert report[first:].startswith('<p class="note"><b>Warning: this model started from visual weights that saw')


def test_a_checkpoint_trained_on_overlapping_weights_passes_the_flag_on(tmp_path, tiny_text_dir, capsys):
    refcoco = refer_toolkit(tmp_path)
    stock = tmp_path / "detr-r50.pth"  # TransVG's download script's name for DETR's COCO weights
    detr_checkpoint(stock)
    first = tmp_path / "first"
    assert main(train_args("refcoco", tiny_text_dir, refcoco, first, stock,
                           "model.visual.allow_eval_overlap=true")) == 0
    assert main(train_args("refcoco", tiny_text_dir, refcoco, tmp_path / "second", "null",
                           f"model.init={first / 'checkpoint'}")) == 2
    assert "was trained with model.visual.allow_eval_overlap=true" in capsys.readouterr().err


def coco_instances(root, image_ids=(1, 2, 3, 4, 5, 6)):
    """COCO's own layout: ``data/coco/annotations/instances_train2014.json`` and ``data/coco/train2014/``."""
    path = root / "data" / "coco" / "annotations" / "instances_train2014.json"
    path.parent.mkdir(parents=True)
    images = [{"id": i, "file_name": coco_name(i), "width": 64, "height": 48} for i in image_ids]
    annotations = [{"id": 100 + i, "image_id": i, "bbox": [4, 4, 20, 16], "category_id": 1 + i % 2, "iscrowd": 0}
                   for i in image_ids]
    annotations.append({"id": 999, "image_id": 1, "bbox": [0, 0, 60, 40], "category_id": 1, "iscrowd": 1})
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "dog"}]}))
    for i in image_ids:
        save_image(root / "data" / "coco" / "train2014" / coco_name(i), (64, 48))
    return path


def test_pretrain_on_coco_leaves_out_the_refer_eval_images(tmp_path, tiny_text_dir, capsys):
    instances = coco_instances(tmp_path)
    refcoco = refer_toolkit(tmp_path)  # val, testA, testB on COCO images 3, 4 and 5
    exclude = json.dumps([{"path": str(refcoco), "split_by": "unc"}])
    scenes = ObjectScenes(instances, "train", 64,
                          exclude=load_config("pretrain-coco", [f"data.exclude={exclude}"]).data.exclude)
    assert (scenes.excluded_images == 3
            and [p.name for p, _ in scenes.items] == [coco_name(1), coco_name(2), coco_name(6)])
    assert [len(objects) for _, objects in scenes.items] == [1, 1, 1]  # the crowd box is no target
    assert scenes.image_root.path == tmp_path / "data" / "coco" / "train2014"

    args = ["pretrain", "--config", "pretrain-coco", "--data", str(instances), "--out", str(tmp_path / "pre")]
    for o in [f"data.exclude={exclude}", *TINY, "pretrain.init=null", "pretrain.steps=2", "pretrain.batch_size=2",
              "data.num_workers=0", "train.amp=none"]:
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{instances}: 3 images, images in {tmp_path / 'data/coco/train2014'} (default); left out 3 images" in out
    weights = tmp_path / "pre" / "visual.safetensors"
    meta = json.loads((tmp_path / "pre" / "meta.json").read_text())
    assert meta["excluded_images"] == 3 and meta["excluded_datasets"] == ["refcoco/unc"]
    assert provenance_of(str(weights)).excluded == {"refcoco/unc"}
    assert eval_overlap(str(weights), str(refcoco)) == ("refcoco/unc", None)

    from safetensors.torch import load_file

    model = build_model("tiny", [f"model.text.name={tiny_text_dir}", *TINY, f"model.visual.pretrained={weights}"])
    torch.testing.assert_close(model.visual_backbone.state_dict()["layer2.0.conv1.weight"],
                               load_file(str(weights))["layer2.0.conv1.weight"])

    kept = load_config("pretrain-coco", [f"data.path={instances}", "data.exclude=[]", *TINY, "pretrain.init=null",
                                         "pretrain.steps=1", "pretrain.batch_size=2",
                                         f"pretrain.out={tmp_path / 'all'}", "data.num_workers=0", "train.amp=none"])
    everything = pretrain(kept, progress=False)
    assert "saw the val and test images of refcoco/unc" in eval_overlap(str(everything), str(refcoco))[1]
    with pytest.raises(LadsError, match="data.exclude: name the REFER datasets"):
        ObjectScenes(instances, "train", 64)
