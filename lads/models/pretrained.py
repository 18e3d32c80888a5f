"""Loading and sharing whole models (docs/design.md §3b): a checkpoint folder into a ``LADS`` in
eval mode, a model into a folder to share, and that folder onto the Hugging Face Hub. The
checkpoint files themselves (atomic writes, metadata, weights) are ``lads.util.checkpoint``'s;
``LADS.from_pretrained``, ``save_pretrained`` and ``push_to_hub`` are front doors onto these."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from lads import __version__
from lads.config import Config, config_from_dict, to_dict
from lads.errors import LadsError
from lads.models.lads import LADS
from lads.util.checkpoint import (
    EVAL,
    WEIGHTS,
    load_weights,
    read_meta,
    restored_model_config,
    save_checkpoint,
)
from lads.util.hub import HUB_ID, upload_folder


def load_model(checkpoint, device=None):
    """(model in eval mode, Config) from a checkpoint folder. ``model.origin`` keeps the folder,
    its config and meta (``save_pretrained`` writes them again)."""
    folder, saved, meta = read_meta(checkpoint)
    cfg = config_from_dict(saved)
    model = LADS(restored_model_config(cfg.model, folder))
    load_weights(folder, model)
    model.origin = {"folder": str(folder), "config": saved, "meta": meta}
    return model.to(device or "cpu").eval(), cfg


def save_pretrained(model, folder, name: str | None = None) -> Path:
    """A checkpoint folder to share (no optimizer state): weights, config, meta, tokenizer and
    card. A model loaded from a checkpoint keeps that checkpoint's config and meta, and its
    ``lads eval`` figures while its weights are still those evaluated; ``name``: what the card's
    example loads (default: the folder)."""
    from safetensors.torch import load_file

    origin, evaluation = getattr(model, "origin", None), None
    if origin:
        config, meta = origin["config"], {k: v for k, v in origin["meta"].items() if k != "files"}
        evaluated = Path(origin["folder"]) / EVAL
        if evaluated.exists():
            saved, own = load_file(str(Path(origin["folder"]) / WEIGHTS)), model.state_dict()
            if all(torch.equal(own[k].cpu(), v) for k, v in saved.items()):
                evaluation = json.loads(evaluated.read_text())
    else:
        config = to_dict(Config(model=model.config))
        meta = {"reason": "save_pretrained", "lads_version": __version__, "torch_version": torch.__version__}
    return save_checkpoint(folder, model, config, meta, tokenizer=model.tokenizer, evaluation=evaluation,
                           card_name=name)


def push_to_hub(model, repo_id: str, private: bool = False, token: str | None = None,
                message: str = "Upload a LADS checkpoint") -> str:
    """Write ``model`` as ``save_pretrained`` does and upload it to ``repo_id`` (created if
    needed); returns the URL of the commit."""
    if not HUB_ID.match(repo_id):
        raise LadsError(f"repo_id {repo_id!r}: expected 'org/name'")
    with tempfile.TemporaryDirectory() as tmp:
        return upload_folder(save_pretrained(model, Path(tmp) / "model", name=repo_id), repo_id, private, token,
                             message)
