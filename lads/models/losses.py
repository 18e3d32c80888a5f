"""Training objective (Eq. 9): L1 + λ_giou (1 − GIoU) − λ_mi I(G; F_l) (Eq. 8)."""

from __future__ import annotations

import torch

from lads.models.gating import Gates
from lads.util.box_ops import cxcywh_to_xyxy, generalized_box_iou


def binary_entropy(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """H(p) = −p log p − (1 − p) log(1 − p), clamped for stability."""
    p = p.clamp(eps, 1 - eps)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def mutual_information(soft: torch.Tensor) -> torch.Tensor:
    """Eq. 8 for one kind of gate: ``soft`` (B, G) = p(g | F_l); p(g) = its batch mean.

    I(G; F_l) = H(G) − H(G | F_l), averaged over the G gates.
    """
    return (binary_entropy(soft.mean(0)) - binary_entropy(soft).mean(0)).mean()


def gate_mutual_information(soft: Gates) -> torch.Tensor:
    """Sum over the two kinds (layer, filter) of their gate-averaged mutual information."""
    return mutual_information(soft.layer) + mutual_information(soft.filter)


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of Σ |b − b̂| over (cx, cy, w, h) (DETR, TransVG)."""
    return (pred - target).abs().sum(-1).mean()


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 − GIoU, boxes given as (cx, cy, w, h)."""
    return (1 - generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))).mean()


def lads_loss(pred, target, soft: Gates | None, giou_weight: float = 1.0, mi_weight: float = 0.1):
    """Eq. 9. Returns the total and its terms; the MI term is absent for the dense network."""
    terms = {"l1": l1_loss(pred, target), "giou": giou_loss(pred, target)}
    total = terms["l1"] + giou_weight * terms["giou"]
    if soft is not None:
        terms["mi"] = gate_mutual_information(soft)
        total = total - mi_weight * terms["mi"]
    terms["loss"] = total
    return terms
