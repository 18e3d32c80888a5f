"""Shared fixtures: a tiny random BERT on disk, tiny LADS models and input batches.

Everything is built on the spot from real parts (no mocks, no downloads).
"""

from __future__ import annotations

import os

import pytest
import torch

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
def bert_base_config_dir(tmp_path_factory) -> str:
    """A BERT-base-sized config (768 hidden, 12 heads, 3072 FFN) with 8 layers, config only:
    what ``model.text.pretrained=false`` needs where bert-base-uncased cannot download."""
    from transformers import BertConfig

    path = tmp_path_factory.mktemp("bert-base-config")
    BertConfig(num_hidden_layers=8).save_pretrained(path)
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


def make_batch(batch: int = 2, size: int = 64, length: int = 7, seed: int = 0, vocab: int = 1000):
    """Images (B, 3, size, size) with some letterbox padding, and token ids with padding."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    pixel_mask = torch.zeros(batch, size, size, dtype=torch.bool)
    pixel_mask[0, :, size * 3 // 4:] = True  # the first image is letterboxed on the right
    images[pixel_mask[:, None].expand_as(images)] = 0
    input_ids = torch.randint(5, vocab, (batch, length), generator=g)
    input_ids[:, 0] = 2  # a [CLS]-like first token
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    lengths[-1] = length
    attention_mask = (torch.arange(length)[None] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask
    return images, pixel_mask, input_ids, attention_mask


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


def engine_overrides(text_dir: str, data: str, out) -> list[str]:
    """A config small enough to train in seconds on 2 CPU cores."""
    return [
        f"model.text.name={text_dir}", "model.text.num_layers=2", "model.image_size=64",
        "model.visual.width=8", "model.fusion.d_model=32", "model.fusion.num_heads=2",
        "model.fusion.ffn_dim=64", "model.fusion.num_layers=2", "model.gating.hidden=8",
        f"data.path={data}", "data.num_workers=0", f"train.out={out}", "train.log_every=1",
        "train.warmup_epochs=0", "train.lr=1e-3", "train.lr_visual=1e-3",
    ]
