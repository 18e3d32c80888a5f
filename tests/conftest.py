"""Shared fixtures: a tiny random BERT on disk, tiny LADS models and input batches.

Plain helpers live in ``helpers.py`` (``from helpers import …``).

Everything is built on the spot from real parts (no mocks, no downloads).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import engine_overrides, make_batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # as fast here, and no OpenMP spin-waiting on shared cores

TINY_BERT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                 vocab_size=1000, max_position_embeddings=64)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A random 4-layer, 32-wide BERT saved with ``save_pretrained`` (weights and config)."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(1234)
    BertModel(BertConfig(**TINY_BERT), add_pooling_layer=False).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def make_tiny(tiny_bert_dir):
    """``make_tiny(*overrides, seed=0)``: the ``tiny`` preset with the tiny random BERT."""
    from lads.models import build_model

    def make(*overrides: str, seed: int = 0):
        torch.manual_seed(seed)
        return build_model("tiny", [f"model.text.name={tiny_bert_dir}", *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_model(make_tiny):
    """One shared tiny model, in eval mode; tests that change it must build their own."""
    return make_tiny().eval()


@pytest.fixture
def batch():
    return make_batch()


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> str:
    """A random 2-layer, 32-wide BERT with the real bert-base-uncased vocabulary and tokenizer
    (copied from the MiniLM shipped in a Python package): what the engine tests train."""
    import shutil

    from transformers import BertConfig, BertModel, BertTokenizer

    from lads.models.text import resolve_text_model

    path = tmp_path_factory.mktemp("tiny-text")
    shutil.copy(os.path.join(resolve_text_model("minilm-l6"), "vocab.txt"), path / "vocab.txt")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(4321)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=30522, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> str:
    """A small synthetic benchmark (real PNG files, REFER format) at 64 px."""
    from lads.datasets import synth

    path = tmp_path_factory.mktemp("synth") / "data"
    synth.generate(path, seed=3, images=10, size=64, progress=False)
    return str(path)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_text_dir, synth_data):
    """A short training run on the small synthetic set: (checkpoint folder, config)."""
    from lads.config import load_config
    from lads.engine import train

    out = tmp_path_factory.mktemp("trained")
    cfg = load_config("tiny", engine_overrides(tiny_text_dir, synth_data, out) + [
        "model.visual.width=16", "model.fusion.d_model=64", "model.fusion.num_heads=4",
        "model.fusion.ffn_dim=128", "train.epochs=150", "train.batch_size=8", "train.micro_batch=8",
        "train.lr_drop_epoch=130", "data.augment=false", "train.checkpoint_every=100000"])
    return train(cfg), cfg
