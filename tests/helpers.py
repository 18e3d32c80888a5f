"""Helpers shared by the tests (imported as ``from helpers import …``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A script of benchmarks/ (``name`` without ``.py``) as a module, loaded afresh each call."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def engine_overrides(text_dir: str, data: str, out) -> list[str]:
    """A config small enough to train in seconds on 2 CPU cores."""
    return [
        f"model.text.name={text_dir}", "model.text.num_layers=2", "model.image_size=64",
        "model.visual.width=8", "model.fusion.d_model=32", "model.fusion.num_heads=2",
        "model.fusion.ffn_dim=64", "model.fusion.num_layers=2", "model.gating.hidden=8",
        f"data.path={data}", "data.num_workers=0", f"train.out={out}", "train.log_every=1",
        "train.warmup_epochs=0", "train.lr=1e-3", "train.lr_visual=1e-3",
        # float32 and no evaluation during training: the engine's exact-parity tests compare
        # weights to 1e-5 (bf16 and eval_every have their own tests)
        "train.amp=none", "train.eval_every=0",
    ]


SMALL_DEMO = [  # `lads demo` in seconds (the text encoder: ``model.text.name`` on top)
    "demo.images=24", "demo.shared_steps=3", "demo.steps=2", "pretrain.steps=2", "pretrain.batch_size=4",
    "model.image_size=64", "model.visual.width=8", "model.fusion.d_model=32", "model.fusion.num_heads=2",
    "model.fusion.ffn_dim=64", "model.fusion.num_layers=2", "model.gating.hidden=8", "model.text.num_layers=2",
    "train.batch_size=4", "train.micro_batch=4", "train.eval_every=0.5", "demo.fit_to_machine=false"]


def queries_by_image(data: str, split: str | None) -> list[tuple[str, list[str]]]:
    """(image, expressions) of a dataset's split (None: all), in the data's order."""
    from lads.datasets import load_records

    by_image: dict[str, list[str]] = {}
    for r in load_records(data, split)[0]:
        by_image.setdefault(r.image, []).append(r.expression)
    return list(by_image.items())
