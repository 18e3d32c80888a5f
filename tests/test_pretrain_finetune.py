"""Pre-train on a mixture, then fine-tune from its weights: training on a mixture resumes
exactly; ``model.init`` loads another run's weights (no optimizer state), reuses its text
folder, and refuses another architecture with a message that says what differs."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from helpers import engine_overrides
from safetensors.torch import load_file

from lads.config import load_config
from lads.engine import init_weights, restored_model_config, train
from lads.errors import LadsError
from lads.util.checkpoint import load_training_state


@pytest.fixture(scope="module")
def mixture_config(tmp_path_factory, tiny_text_dir, synth_data):
    """The small synthetic set twice: its train split (weight 3) and its test split (weight 1)."""
    tmp = tmp_path_factory.mktemp("mix")
    mixture = [{"path": synth_data, "split": "train", "weight": 3}, {"path": synth_data, "split": "test", "weight": 1}]
    return tmp, engine_overrides(tiny_text_dir, synth_data, tmp / "unused") + [
        f"data.mixture={json.dumps(mixture)}", f"data.index_dir={tmp / 'index'}", "data.augment=false",
        "train.batch_size=4", "train.micro_batch=2", "train.lr_drop_epoch=100", "train.checkpoint_every=100000"]


def test_mixture_training_resumes_exactly(mixture_config, capsys):
    tmp, common = mixture_config
    whole = train(load_config("tiny", common + ["train.epochs=2", f"train.out={tmp / 'whole'}"]))
    said = capsys.readouterr().out
    assert "mixture of 2 sources" in said and "share 75.0 %" in said
    half = train(load_config("tiny", common + ["train.epochs=1", f"train.out={tmp / 'cut'}"]))
    resumed = train(load_config("tiny", common + ["train.epochs=2", f"train.out={tmp / 'cut'}"]), resume=str(half))
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, tiny_text_dir, synth_data):
    out = tmp_path_factory.mktemp("dense")
    cfg = load_config("tiny", engine_overrides(tiny_text_dir, synth_data, out) + [
        "model.dense=true", "train.epochs=1", "train.batch_size=4", "train.micro_batch=4"])
    return train(cfg), cfg


def test_init_loads_weights_and_the_checkpoint_text_folder(dense_run, tmp_path, synth_data):
    checkpoint, dense_cfg = dense_run
    saved = load_file(str(checkpoint / "model.safetensors"))
    # the fine-tuning config names a text model this machine does not have: the checkpoint's text/ serves
    cfg = copy.deepcopy(dense_cfg)
    cfg.model.dense, cfg.model.text.name, cfg.model.init = False, "/nowhere/bert", str(checkpoint)
    cfg.train.out = str(tmp_path / "ft")
    built = restored_model_config(cfg.model, cfg.model.init)
    assert built.text.name == str(checkpoint / "text") and built.text.pretrained is False
    from lads.models import LADS

    model = LADS(built)
    init_weights(model, cfg.model.init)
    state = model.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert any(k.startswith("gating.") for k in state) and not any(k.startswith("gating.") for k in saved)

    finetuned = train(cfg)  # starts at step 0 with a fresh optimizer, then trains its own steps
    steps = json.loads((finetuned / "meta.json").read_text())["step"]
    assert steps == json.loads((checkpoint / "meta.json").read_text())["step"]  # one epoch each
    moments = load_training_state(finetuned)["optimizer"]["state"]
    assert all(int(s["step"]) == steps for s in moments.values())  # no moments carried over from the dense run
    assert json.loads((finetuned / "config.json").read_text())["model"]["init"] == str(checkpoint)


def test_init_from_batch_norm_into_frozen_batch_norm(dense_run):
    """A checkpoint trained with batch norm starts a model with frozen batch norm (the paper
    presets' kind): its statistics and affine parameters load, its step counters are dropped, and
    in eval mode both models give the same boxes."""
    checkpoint, dense_cfg = dense_run
    cfg = copy.deepcopy(dense_cfg)
    assert cfg.model.visual.norm == "batch"
    cfg.model.visual.norm, cfg.model.visual.frozen_stages, cfg.model.init = "frozen", 1, str(checkpoint)
    from lads.models import LADS

    frozen = LADS(restored_model_config(cfg.model, cfg.model.init))
    init_weights(frozen, cfg.model.init)
    batch = LADS.from_pretrained(checkpoint)
    assert not any(k.endswith("num_batches_tracked") for k in frozen.state_dict())
    images = torch.randn(2, 3, cfg.model.image_size, cfg.model.image_size, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, cfg.model.image_size, cfg.model.image_size, dtype=torch.bool)
    mask[1, :, cfg.model.image_size // 2:] = True
    ids = torch.tensor([[101, 1996, 2417, 2611, 102], [101, 1037, 2417, 102, 0]])
    with torch.no_grad():
        got = frozen.eval()(images, mask, ids, (ids > 0).long())
        want = batch.eval()(images, mask, ids, (ids > 0).long())
    torch.testing.assert_close(got["boxes"], want["boxes"], rtol=1e-5, atol=1e-5)


def test_init_with_another_architecture_says_what_differs(dense_run, tmp_path):
    checkpoint, dense_cfg = dense_run
    cfg = copy.deepcopy(dense_cfg)
    cfg.model.fusion.num_layers, cfg.model.init = 1, str(checkpoint)
    from lads.models import LADS

    model = LADS(restored_model_config(cfg.model, cfg.model.init))
    with pytest.raises(LadsError, match=r"model\.init=\S+: \S+model\.safetensors does not fit this model's config: "
                                        r"missing \[\], unexpected \['fusion\.layers\.1\..*"
                                        r"must match the checkpoint's"):
        init_weights(model, cfg.model.init)
    with pytest.raises(LadsError, match="no such folder"):
        init_weights(model, checkpoint.parent / "nothing")


def test_the_paper_presets_pretrain_then_finetune():
    pre = load_config("pretrain-mixture")
    assert [s.path.split("/")[-1] for s in pre.data.mixture] == [
        "refcoco", "refcoco+", "refcocog", "refclef", "visual_genome", "flickr30k_entities"]
    assert pre.data.exclude is None  # leak-free by default: the eval splits of its REFER sources
    assert (pre.train.epochs, pre.train.lr_drop_epoch, pre.train.batch_size) == (40, 30, 512)  # the paper
    for name in ("refcoco-ft", "refcoco+-ft", "refcocog-ft", "referit-ft"):
        ft = load_config(name)
        assert ft.model.init == "runs/pretrain-mixture/checkpoint" and not ft.data.mixture
        assert (ft.train.epochs, ft.train.lr_drop_epoch, ft.train.batch_size) == (20, 10, 256)
        assert dataclasses.replace(ft.model, init=None) == pre.model  # the same architecture: a strict load
