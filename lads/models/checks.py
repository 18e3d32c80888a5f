"""Checks of what a caller gives the model (inputs, hard gates) and of a model config's heads,
with messages that say what was expected."""

from __future__ import annotations

import torch

from lads.config import ModelConfig
from lads.errors import LadsError
from lads.models.gating import GateLayout, Gates


def check_inputs(images, pixel_mask, input_ids, attention_mask, image_index=None):
    """Shape and dtype checks with messages that say what was expected. ``image_index``: where
    row i of the text reads image ``image_index[i]`` (default: image i)."""
    if not (torch.is_tensor(images) and images.dim() == 4 and images.shape[1] == 3 and images.is_floating_point()):
        raise LadsError(f"images: expected a float tensor (B, 3, H, W), got {_describe(images)}")
    n, _, h, w = images.shape
    if not (torch.is_tensor(pixel_mask) and pixel_mask.dtype == torch.bool and tuple(pixel_mask.shape) == (n, h, w)):
        raise LadsError(f"pixel_mask: expected a bool tensor ({n}, {h}, {w}), True = padding, "
                        f"got {_describe(pixel_mask)}")
    b = n
    if image_index is not None:
        if not (torch.is_tensor(image_index) and image_index.dim() == 1 and image_index.dtype == torch.long):
            raise LadsError(f"image_index: expected a long tensor (B,), got {_describe(image_index)}")
        b = len(image_index)
        if b and not (0 <= int(image_index.min()) and int(image_index.max()) < n):
            raise LadsError(f"image_index: values must index the {n} images (0 to {n - 1})")
    if not (torch.is_tensor(input_ids) and input_ids.dim() == 2 and input_ids.shape[0] == b
            and input_ids.dtype == torch.long):
        raise LadsError(f"input_ids: expected a long tensor ({b}, L), got {_describe(input_ids)}")
    if not (torch.is_tensor(attention_mask) and tuple(attention_mask.shape) == tuple(input_ids.shape)):
        raise LadsError(f"attention_mask: expected a tensor {tuple(input_ids.shape)}, got {_describe(attention_mask)}")


def check_heads(config: ModelConfig):
    """The inference head exists and the token head's box is trained when it is the one used."""
    w = config.loss
    if config.head not in ("cls", "token"):
        raise LadsError(f"model.head must be 'cls' (the paper) or 'token', got {config.head!r}")
    if config.head == "token" and not (w.token > 0 and w.token_box > 0):
        raise LadsError("model.head=token needs model.loss.token > 0 and model.loss.token_box > 0 (its training terms)")
    for name in ("giou", "mi", "token", "token_box", "deep", "flops", "flops_target", "flops_floor"):
        if getattr(w, name) < 0:
            raise LadsError(f"model.loss.{name} must be >= 0, got {getattr(w, name)}")
    if w.flops_floor > w.flops_target:
        raise LadsError(f"model.loss.flops_floor ({w.flops_floor}) must not exceed model.loss.flops_target "
                        f"({w.flops_target})")


def check_gates(gates: Gates, layout: GateLayout, batch: int):
    expected = {"layer": (batch, layout.num_layer_gates), "filter": (batch, layout.num_filter_gates)}
    for kind, shape in expected.items():
        g = getattr(gates, kind)
        if not torch.is_tensor(g) or tuple(g.shape) != shape:
            raise LadsError(f"gates.{kind}: expected shape {shape}, got {_describe(g)}")
        if not bool(((g == 0) | (g == 1)).all()):
            raise LadsError(f"gates.{kind}: hard gates must be 0 or 1")


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
