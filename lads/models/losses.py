"""Training objective (Eq. 9): L1 + λ_giou (1 − GIoU) − λ_mi I(G; F_l) (Eq. 8), and the
training-only terms beyond the paper (``model.loss``; docs/design.md §5a)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def box_loss(pred: torch.Tensor, target: torch.Tensor, giou_weight: float) -> torch.Tensor:
    """L1 + λ_giou (1 − GIoU), the box part of Eq. 9."""
    return l1_loss(pred, target) + giou_weight * giou_loss(pred, target)


def centre_cell(box: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Index in the flattened h × w grid of the cell holding each (cx, cy, w, h) box's centre."""
    h, w = grid
    return (box[:, 1] * h).long().clamp(0, h - 1) * w + (box[:, 0] * w).long().clamp(0, w - 1)


def token_loss(scores: torch.Tensor, target: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cross-entropy of the token scores (B, h·w) against the target's centre cell."""
    return F.cross_entropy(scores, centre_cell(target, grid))


def expected_flops(soft: Gates, layout, costs: dict) -> torch.Tensor:
    """(B,) FLOPs of each expression's subnet with its gates, over those of the dense network
    (linear in the gates: soft gates give the expectation); ``costs`` from
    ``lads.util.flops.gate_costs``."""
    layer_gates, filter_gates, fusion_gates = layout.split(soft)
    ones = soft.layer.new_ones(len(soft))
    total = costs["fixed"].to(soft.layer) * ones
    for b, (g_layer, g_filter) in enumerate(zip(layer_gates, filter_gates)):
        run = ones if g_layer is None else g_layer
        total = total + run * (costs["block"][b].to(run) + costs["filter"][b].to(run) * g_filter.sum(1))
    for k, g in enumerate(fusion_gates):
        total = total + g * costs["fusion"][k].to(g)
    dense = costs["fixed"] + costs["block"].sum() + (costs["filter"] * torch.tensor(
        [s.stop - s.start for s in layout.filter_slices], dtype=torch.float64)).sum() + costs["fusion"].sum()
    return total / dense.to(total)


def lads_loss(outputs: dict, target: torch.Tensor, weights) -> dict[str, torch.Tensor]:
    """Eq. 9 on the paper's head, then the training-only terms whose ``weights`` are not 0:

    - ``deep``: Eq. 9's box terms on the earlier layers' ``[CLS]`` boxes, averaged (DETR);
    - ``token``: cross-entropy of the token scores against the target's centre cell;
    - ``token_box``: the box terms on the token head's box at the target's centre cell;
    - ``flops``: ``relu(F − flops_target) + relu(flops_floor − F)``, F the mean FLOPs fraction
      over the batch, the FLOPs of the gates that evaluation would use, ``1[r ≥ 0]``, with the
      gradient of ``σ(r)`` (``outputs["flops"]``): a budget on the average subnet, and a floor
      under it, so that models trained under one budget end at the same FLOPs.

    Returns the total (``loss``) and every term; the MI term is absent for the dense network.
    """
    pred = outputs["heads"]["cls"]
    terms = {"l1": l1_loss(pred, target), "giou": giou_loss(pred, target)}
    total = terms["l1"] + weights.giou * terms["giou"]
    if outputs["soft"] is not None:
        terms["mi"] = gate_mutual_information(outputs["soft"])
        total = total - weights.mi * terms["mi"]
    if outputs.get("flops") is not None:
        terms["flops"] = outputs["flops"].mean()
        if weights.flops:
            total = total + weights.flops * (torch.relu(terms["flops"] - weights.flops_target)
                                             + torch.relu(weights.flops_floor - terms["flops"]))
    if weights.deep and outputs["deep_boxes"]:
        terms["deep"] = torch.stack([box_loss(b, target, weights.giou) for b in outputs["deep_boxes"]]).mean()
        total = total + weights.deep * terms["deep"]
    if weights.token:
        terms["token"] = token_loss(outputs["token_scores"], target, outputs["grid"])
        total = total + weights.token * terms["token"]
    if weights.token_box:
        boxes = outputs["token_boxes"][torch.arange(len(target)), centre_cell(target, outputs["grid"])]
        terms["token_box"] = box_loss(boxes, target, weights.giou)
        total = total + weights.token_box * terms["token_box"]
    terms["loss"] = total
    return terms
