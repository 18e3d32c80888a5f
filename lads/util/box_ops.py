"""Box conversions, IoU and generalised IoU (boxes as (..., 4) tensors)."""

from __future__ import annotations

import torch


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def _area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def iou_and_union(a: torch.Tensor, b: torch.Tensor):
    """Element-wise IoU of paired xyxy boxes, and their union area."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = _area(a) + _area(b) - inter
    return inter / union.clamp(min=1e-7), union


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return iou_and_union(a, b)[0]


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU (Rezatofighi et al. 2019) of paired xyxy boxes, in [-1, 1]."""
    iou, union = iou_and_union(a, b)
    enclosing = _area(torch.cat((torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])), -1))
    return iou - (enclosing - union) / enclosing.clamp(min=1e-7)
