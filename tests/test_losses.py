"""The training objective (Eq. 9): mutual information (Eq. 8), L1 and GIoU."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lads.config import LossConfig
from lads.models import Gates
from lads.models.losses import (
    binary_entropy,
    centre_cell,
    gate_mutual_information,
    giou_loss,
    l1_loss,
    lads_loss,
    mutual_information,
    token_loss,
)
from lads.util.box_ops import box_iou, cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh

LN2 = math.log(2)


def h(p: float) -> float:
    return -p * math.log(p) - (1 - p) * math.log(1 - p)


# ----------------------------------------------------------------------------- mutual information


def test_mutual_information_equals_hand_computation():
    """3 expressions × 2 gates: I = mean over gates of H(mean p) − mean H(p), worked out by hand."""
    soft = [[0.9, 0.2], [0.3, 0.2], [0.6, 0.8]]
    per_gate = []
    for j in range(2):
        col = [row[j] for row in soft]
        per_gate.append(h(sum(col) / 3) - sum(h(p) for p in col) / 3)
    expected = sum(per_gate) / 2
    # gate 0: H(0.6) − (H(0.9) + H(0.3) + H(0.6)) / 3; gate 1: H(0.4) − (2 H(0.2) + H(0.8)) / 3
    assert expected == pytest.approx((0.13669 + 0.17261) / 2, abs=1e-5)
    got = mutual_information(torch.tensor(soft, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_mutual_information_is_zero_when_gates_ignore_the_expression():
    """Every expression gets the same gate probabilities: I(G; F) = 0."""
    row = torch.tensor([0.1, 0.5, 0.73, 0.99], dtype=torch.float64)
    assert mutual_information(row.expand(6, 4)).abs().item() < 1e-12


def test_mutual_information_is_ln2_for_balanced_input_dependent_hard_gates():
    """Each gate open for half of the expressions, near-hard: I = ln 2 per gate (the maximum)."""
    soft = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float64)
    soft = soft.clamp(1e-9, 1 - 1e-9)
    assert mutual_information(soft).item() == pytest.approx(LN2, abs=1e-4)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(0, 1), min_size=3, max_size=3), min_size=2, max_size=6))
def test_mutual_information_is_between_zero_and_ln2(rows):
    """For any soft gates: 0 ≤ I ≤ ln 2 (Jensen and the binary entropy's maximum), up to the
    entropy's clamp at 1e-6, which can cost about 1e-5 near p = 0 or 1."""
    value = mutual_information(torch.tensor(rows, dtype=torch.float64)).item()
    assert -2e-5 <= value <= LN2 + 1e-9


def test_two_kinds_are_averaged_then_summed():
    """I(G; F) = mean over layer gates + mean over filter gates: 1,000 uninformative filter gates
    do not drown 2 informative layer gates."""
    layer = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
    filt = torch.full((2, 1000), 0.7, dtype=torch.float64)
    total = gate_mutual_information(Gates(layer, filt))
    assert total.item() == pytest.approx(mutual_information(layer).item() + mutual_information(filt).item())
    assert total.item() == pytest.approx(LN2, abs=1e-4)


def test_binary_entropy_is_finite_at_0_and_1():
    p = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    value = binary_entropy(p)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(p.grad).all()
    assert value[1].item() == pytest.approx(LN2)


# ----------------------------------------------------------------------------- boxes


def naive_giou(a, b) -> float:
    """GIoU of two xyxy boxes, in float64 Python arithmetic."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (enclosing - union) / enclosing


def test_l1_equals_hand_computation():
    """Mean over the batch of the summed |Δ| over (cx, cy, w, h)."""
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.1, 0.9, 0.3, 0.4]])
    target = torch.tensor([[0.4, 0.5, 0.2, 0.5], [0.1, 0.8, 0.1, 0.4]])
    # |0.1| + 0 + 0 + |0.3| = 0.4 and 0 + |0.1| + |0.2| + 0 = 0.3
    assert l1_loss(pred, target).item() == pytest.approx(0.35, abs=1e-6)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([0, 0, 1, 1], [0, 0, 1, 1], 1.0),  # identical
        ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7 - 2 / 9),  # overlap 1, union 7, hull 9
        ([0, 0, 1, 1], [2, 0, 3, 1], -1 / 3),  # disjoint: IoU 0, hull 3, union 2
        ([0, 0, 1, 1], [3, 3, 4, 4], 2 / 16 - 1),  # far apart: towards −1
        ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16),  # nested: GIoU = IoU
    ],
)
def test_giou_equals_hand_values(a, b, expected):
    got = generalized_box_iou(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_giou_matches_naive_float64_on_random_boxes():
    """200 random pairs, overlapping or not, against the naive float64 formula."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, 2, generator=g, dtype=torch.float64)
    wh = 0.01 + 0.5 * torch.rand(200, 2, 2, generator=g, dtype=torch.float64)
    boxes = torch.cat((xy, xy + wh), -1)
    a, b = boxes[:, 0], boxes[:, 1]
    want = torch.tensor([naive_giou(x.tolist(), y.tolist()) for x, y in zip(a, b)], dtype=torch.float64)
    got = generalized_box_iou(a, b)
    assert (want < 0).any() and (want > 0).any()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # the float32 loss on (cx, cy, w, h) agrees with the naive mean of 1 − GIoU
    loss = giou_loss(xyxy_to_cxcywh(a).float(), xyxy_to_cxcywh(b).float())
    assert loss.item() == pytest.approx((1 - want).mean().item(), abs=1e-5)


def test_degenerate_boxes_are_finite_with_finite_gradients():
    """Zero-width (and zero-area) boxes: GIoU, the loss and its gradients stay finite."""
    pred = torch.tensor([[0.5, 0.5, 0.0, 0.2], [0.3, 0.3, 0.0, 0.0], [0.2, 0.2, 0.0, 0.1]], requires_grad=True)
    target = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.0, 0.0], [0.8, 0.8, 0.0, 0.1]])
    giou = generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))
    assert torch.isfinite(giou).all() and (giou >= -1).all() and (giou <= 1).all()
    # a line inside a box: IoU 0, the hull is the box, union the box: GIoU 0
    assert giou[0].item() == pytest.approx(0.0, abs=1e-6)
    loss = l1_loss(pred, target) + giou_loss(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_box_iou_and_conversions():
    box = torch.tensor([0.25, 0.5, 0.75, 1.0])
    assert torch.equal(cxcywh_to_xyxy(xyxy_to_cxcywh(box)), box)
    assert box_iou(torch.tensor([0.0, 0, 2, 2]), torch.tensor([1.0, 0, 3, 2])).item() == pytest.approx(1 / 3)


def _outputs(pred, soft=None, **extra):
    """``forward``'s outputs as ``lads_loss`` reads them: the paper's head only, unless given."""
    out = {"heads": {"cls": pred}, "soft": soft, "deep_boxes": [], "token_scores": None, "token_boxes": None,
           "grid": (2, 2)}
    return {**out, **extra}


def test_lads_loss_combines_the_terms_as_eq9():
    """loss = L1 + λ_giou (1 − GIoU) − λ_mi I(G; F), with the weights given."""
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.6, 0.3, 0.1]])
    target = torch.tensor([[0.45, 0.5, 0.3, 0.2], [0.4, 0.5, 0.3, 0.2]])
    soft = Gates(torch.tensor([[0.9, 0.2], [0.1, 0.7]]), torch.tensor([[0.6, 0.3, 0.5], [0.2, 0.9, 0.5]]))
    terms = lads_loss(_outputs(pred, soft), target, LossConfig(giou=2.0, mi=0.5))
    want = l1_loss(pred, target) + 2.0 * giou_loss(pred, target) - 0.5 * gate_mutual_information(soft)
    assert terms["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert terms["mi"].item() > 0
    assert set(lads_loss(_outputs(pred), target, LossConfig())) == {"l1", "giou", "loss"}


# ----------------------------------------------------------------------------- training-only terms


def test_centre_cell_by_hand():
    """A 3 × 4 grid (h = 3 rows, w = 4 columns): cells are row · 4 + col of the centre."""
    boxes = torch.tensor([[0.10, 0.10, 0.1, 0.1],   # col 0, row 0 -> 0
                          [0.60, 0.50, 0.2, 0.2],   # col 2, row 1 -> 6
                          [0.99, 0.99, 0.1, 0.1],   # col 3, row 2 -> 11
                          [1.00, 1.00, 0.1, 0.1]])  # on the far edge: the last cell
    assert centre_cell(boxes, (3, 4)).tolist() == [0, 6, 11, 11]


def test_token_term_equals_hand_cross_entropy():
    """−log softmax(scores)[centre cell], averaged, with padded cells (−inf) left out."""
    scores = torch.tensor([[1.0, 2.0, 0.5, float("-inf")], [0.0, 0.0, 3.0, 1.0]])
    target = torch.tensor([[0.7, 0.2, 0.1, 0.1], [0.2, 0.8, 0.1, 0.1]])  # cells 1 and 2 of a 2 × 2 grid
    by_hand = [2.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5)),
               3.0 - math.log(2 + math.exp(3.0) + math.exp(1.0))]
    want = -sum(by_hand) / 2
    assert token_loss(scores, target, (2, 2)).item() == pytest.approx(want, rel=1e-6)
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)
    terms = lads_loss(_outputs(pred, token_scores=scores), target, LossConfig(token=0.5))
    base = l1_loss(pred, target) + giou_loss(pred, target)
    assert terms["token"].item() == pytest.approx(want, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(base.item() + 0.5 * want, rel=1e-6)


def test_token_box_and_deep_terms_equal_hand_computation():
    """token_box: Eq. 9's box terms on the token box at the target's centre cell; deep: their
    mean over the earlier layers' boxes."""
    target = torch.tensor([[0.7, 0.2, 0.2, 0.2], [0.2, 0.8, 0.3, 0.1]])  # cells 1 and 2 of 2 × 2
    token_boxes = torch.rand(2, 4, 4) * 0.5 + 0.25
    deep = [torch.tensor([[0.6, 0.3, 0.2, 0.1], [0.3, 0.7, 0.2, 0.2]]), torch.tensor([[0.5, 0.5, 0.4, 0.4]] * 2)]
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)
    w = LossConfig(giou=2.0, token_box=0.3, deep=0.7)
    terms = lads_loss(_outputs(pred, token_boxes=token_boxes, deep_boxes=deep), target, w)

    def by_hand(p):  # L1 summed over coordinates, 1 − GIoU, each averaged over the batch
        rows = []
        for pi, ti in zip(p.tolist(), target.tolist()):
            l1 = sum(abs(a - b) for a, b in zip(pi, ti))
            giou = generalized_box_iou(cxcywh_to_xyxy(torch.tensor(pi)), cxcywh_to_xyxy(torch.tensor(ti))).item()
            rows.append(l1 + 2.0 * (1 - giou))
        return sum(rows) / len(rows)

    picked = torch.stack([token_boxes[0, 1], token_boxes[1, 2]])
    assert terms["token_box"].item() == pytest.approx(by_hand(picked), rel=1e-5)
    assert terms["deep"].item() == pytest.approx((by_hand(deep[0]) + by_hand(deep[1])) / 2, rel=1e-5)
    eq9 = by_hand(pred)
    assert terms["loss"].item() == pytest.approx(eq9 + 0.3 * by_hand(picked) + 0.7 * terms["deep"].item(), rel=1e-5)
