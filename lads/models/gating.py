"""Gating network (Eqs. 1-3) and binary gates (Eqs. 4-5).

Candidate layers, in this order: the 16 bottlenecks of the visual backbone (P = 16), then the
MHSA and FFN sublayers of the M fusion layers (2M). A candidate has a layer gate when it has
an identity residual (12 bottlenecks, every sublayer), and ``c_i`` filter gates when it is a
bottleneck (its width). All candidates are computed at once with stacked weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lads.errors import LadsError
from lads.util.amp import full_precision


@dataclass(frozen=True)
class Candidate:
    name: str  # "layer2.1" or "fusion.3.attn"
    layer_gate: bool
    filters: int  # 0 for fusion sublayers


class GateLayout:
    """Where each gate lives: candidate names, layer-gate and filter-gate owners."""

    def __init__(self, candidates: list[Candidate]):
        self.candidates = candidates
        self.names = [c.name for c in candidates]
        self.layer_owner = [i for i, c in enumerate(candidates) if c.layer_gate]
        self.filter_owner = [i for i, c in enumerate(candidates) for _ in range(c.filters)]
        self.num_visual = sum(1 for c in candidates if c.filters)
        starts = [0]
        for c in candidates:
            starts.append(starts[-1] + c.filters)
        self.filter_slices = [slice(starts[i], starts[i + 1]) for i in range(self.num_visual)]
        self.layer_slot = {owner: j for j, owner in enumerate(self.layer_owner)}

    @classmethod
    def for_model(cls, blocks, num_fusion_layers: int) -> "GateLayout":
        """``blocks``: (name, Bottleneck) pairs of the visual backbone."""
        visual = [Candidate(n, b.has_layer_gate, b.conv2.out_channels) for n, b in blocks]
        fusion = [
            Candidate(f"fusion.{i}.{kind}", True, 0)
            for i in range(num_fusion_layers)
            for kind in ("attn", "ffn")
        ]
        return cls(visual + fusion)

    @property
    def num_layer_gates(self) -> int:
        return len(self.layer_owner)

    @property
    def num_filter_gates(self) -> int:
        return len(self.filter_owner)

    def runs(self, layer) -> np.ndarray:
        """(N, K) 0/1 from (N, n_L) layer gates: whether each candidate runs (the 4 projection
        bottlenecks, which have no layer gate, always do)."""
        layer = np.asarray(layer, dtype=float)
        runs = np.ones((layer.shape[0], len(self.candidates)))
        runs[:, self.layer_owner] = layer
        return runs

    def filters_kept(self, layer, filt) -> np.ndarray:
        """(N, P) filters that run in each bottleneck: its open filter gates, and none where the
        bottleneck is skipped. The one definition of "filters kept" (predict, eval, analyze,
        the report; docs/design.md §3)."""
        filt = np.asarray(filt, dtype=float)
        open_ = np.stack([filt[:, s].sum(1) for s in self.filter_slices], 1)
        return open_ * self.runs(layer)[:, : self.num_visual]

    def kept(self, layer, filt=None) -> dict[str, np.ndarray]:
        """Per expression (N,): bottlenecks run (of 16, projection blocks included), fusion
        sublayers run (of 2M) and, given the filter gates, filters run (of ``num_filter_gates``)."""
        runs = self.runs(layer)
        kept = {"visual_layers": runs[:, : self.num_visual].sum(1),
                "fusion_sublayers": runs[:, self.num_visual :].sum(1)}
        if filt is not None:
            kept["filters"] = self.filters_kept(layer, filt).sum(1)
        return kept

    def summary(self, gates: "Gates | None", j: int = 0) -> dict:
        """Expression ``j``'s subnet in numbers and one line; every gate open for ``None``."""
        if gates is None:
            visual, fusion, filters = self.num_visual, len(self.candidates) - self.num_visual, self.num_filter_gates
        else:
            kept = self.kept(gates.layer[j : j + 1].float().cpu(), gates.filter[j : j + 1].float().cpu())
            visual, fusion, filters = (int(kept[k][0]) for k in ("visual_layers", "fusion_sublayers", "filters"))
        return {
            "visual_layers": visual, "fusion_sublayers": fusion, "filters": filters,
            "summary": f"{visual}/{self.num_visual} bottlenecks, {fusion}/{len(self.candidates) - self.num_visual} "
                       f"fusion sublayers, {filters}/{self.num_filter_gates} filters",
        }

    def split(self, gates: "Gates"):
        """Per-module gate lists: visual layer gates (None where a block has none), visual
        filter gates, fusion sublayer gates."""
        layer_gates = [
            gates.layer[:, self.layer_slot[i]] if i in self.layer_slot else None
            for i in range(self.num_visual)
        ]
        filter_gates = [gates.filter[:, s] for s in self.filter_slices]
        fusion_gates = [gates.layer[:, self.layer_slot[i]] for i in range(self.num_visual, len(self.candidates))]
        return layer_gates, filter_gates, fusion_gates


@dataclass
class Gates:
    """Gates of a batch, hard (0 or 1) or soft (in [0, 1]): ``layer`` (B, n_L), ``filter`` (B, Σ c_i)."""

    layer: torch.Tensor
    filter: torch.Tensor

    def map(self, fn) -> "Gates":
        return Gates(fn(self.layer), fn(self.filter))

    def __len__(self) -> int:
        return self.layer.shape[0]


@dataclass
class Relevance:
    """Relevance scores ``r`` of Eq. 3 of a batch, one per gate: ``layer`` (B, n_L), ``filter``
    (B, Σ c_i); a gate is open where ``r ≥ 0``."""

    layer: torch.Tensor
    filter: torch.Tensor

    def gates(self, fn) -> Gates:
        """``Gates(fn(r_L), fn(r_C))``: σ, the threshold, or Eq. 5's straight-through gates."""
        return Gates(fn(self.layer), fn(self.filter))


class GatingNetwork(nn.Module):
    """Relevance scores from linguistic features (Eqs. 1-3), all candidate layers at once.

    ``static``: the static control (docs/design.md §5c). The network reads a learned constant
    token in place of ``F_l``, so every expression gets the same gates, and its weights move
    those gates as fast as LADS's weights move its own: one mask learned under the same training.
    """

    def __init__(self, layout: GateLayout, text_dim: int, hidden: int, bias_init: float, static: bool = False):
        super().__init__()
        k = len(layout.candidates)
        self.register_buffer("layer_owner", torch.tensor(layout.layer_owner), persistent=False)
        self.register_buffer("filter_owner", torch.tensor(layout.filter_owner), persistent=False)
        self.embedding = nn.Parameter(torch.randn(k, text_dim) * 0.02)  # e_i of Eq. 1
        self.w1 = nn.Parameter(torch.empty(k, text_dim, hidden))  # W_1^i of Eq. 3
        self.b1 = nn.Parameter(torch.zeros(k, hidden))
        self.w2 = nn.Parameter(torch.empty(layout.num_layer_gates, hidden))  # W_2^i
        self.b2 = nn.Parameter(torch.full((layout.num_layer_gates,), bias_init))
        self.w3 = nn.Parameter(torch.empty(layout.num_filter_gates, hidden))  # rows of W_3^i
        self.b3 = nn.Parameter(torch.full((layout.num_filter_gates,), bias_init))
        bound = 1 / text_dim**0.5
        nn.init.uniform_(self.w1, -bound, bound)
        nn.init.uniform_(self.w2, -(1 / hidden**0.5), 1 / hidden**0.5)
        nn.init.uniform_(self.w3, -(1 / hidden**0.5), 1 / hidden**0.5)
        # unit variance per feature, as the LayerNorm output F_l of BERT has
        self.constant = nn.Parameter(torch.randn(1, 1, text_dim)) if static else None

    def attention(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """α_i of Eq. 1: (B, K, L), a softmax over the valid tokens."""
        scores = torch.einsum("kd,bld->bkl", self.embedding, text)
        return scores.masked_fill(~text_mask[:, None, :], float("-inf")).softmax(-1)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor):
        """Returns relevance scores ``Relevance(r_L, r_C)`` and the attention weights α over the
        expression's tokens (None for the static control, which reads none)."""
        static = self.constant is not None
        if static:  # one token, the same for every expression
            text = self.constant.expand(text.shape[0], 1, -1)
            text_mask = text_mask.new_ones(text.shape[0], 1)
        with full_precision(text):
            text = text.float()
            alpha = self.attention(text, text_mask)
            h = torch.einsum("bkl,bld->bkd", alpha, text)  # Eq. 2
            z = F.gelu(torch.einsum("bkd,kdh->bkh", h, self.w1) + self.b1)  # δ(W_1^i h_i)
            r_layer = torch.einsum("bgh,gh->bg", z[:, self.layer_owner], self.w2) + self.b2
            r_filter = torch.einsum("bgh,gh->bg", z[:, self.filter_owner], self.w3) + self.b3
        return Relevance(r_layer, r_filter), None if static else alpha


def straight_through(r: torch.Tensor) -> torch.Tensor:
    """``1[r ≥ 0]`` with the gradient of ``σ(r)``. The value is exactly 0 or 1:
    ``σ - σ.detach()`` is exactly 0, where ``(hard + σ) - σ`` would round 1 to 0.99999994."""
    soft = torch.sigmoid(r)
    return (r >= 0).to(soft.dtype) + (soft - soft.detach())


def binary_gates(relevance: Relevance, training: bool, granularity: str = "batch",
                 n_s: float | None = None) -> tuple[Gates, Gates]:
    """Eqs. 4-5 for both kinds of gate: returns (g, g_s), each a ``Gates``.

    Training: ``r̂ = r + ε``, ε ~ Logistic(0, 1); ``g_s = σ(r̂)``; ``g_h = 1[r̂ ≥ 0]`` with a
    straight-through gradient; ``g = g_s`` if ``n_s ≥ 0.5`` else ``g_h``, ``n_s ~ U(0, 1)``. Per
    ``"batch"`` there is one ``n_s`` for the batch, shared by the layer and the filter gates (the
    paper's single draw): the given ``n_s`` (the engine draws one per optimizer step, for all its
    micro-batches and ranks), else drawn here; per ``"element"``, one for every gate of every
    expression. Evaluation: no noise, ``g = g_h``, ``g_s = σ(r)``.
    """
    if granularity not in ("batch", "element"):
        raise LadsError(f"model.gating.granularity must be 'batch' or 'element', got {granularity!r}")
    if not training:
        return relevance.gates(lambda r: (r >= 0).to(r.dtype)), relevance.gates(torch.sigmoid)
    device = relevance.layer.device
    if granularity == "element":
        n_s = None
    else:
        n_s = torch.rand((), device=device) if n_s is None else torch.as_tensor(n_s, device=device)

    def gate(r):
        u = torch.rand_like(r).clamp_(1e-6, 1 - 1e-6)
        noisy = r + torch.log(u) - torch.log1p(-u)
        soft, hard = torch.sigmoid(noisy), straight_through(noisy)
        use_soft = (n_s if n_s is not None else torch.rand_like(r)) >= 0.5
        return torch.where(use_soft, soft, hard), soft

    (layer, layer_soft), (filt, filt_soft) = gate(relevance.layer), gate(relevance.filter)
    return Gates(layer, filt), Gates(layer_soft, filt_soft)
