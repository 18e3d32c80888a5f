"""The heads on the fused sequence: the paper's box regressed from the fused ``[CLS]`` (Eq. 9's
head) and the token head beyond the paper (docs/design.md §5a), and how boxes are read from them."""

from __future__ import annotations

import torch
from torch import nn

from lads.util.amp import full_precision


class BoxHead(nn.Module):
    """Fused ``[CLS]`` -> 3-layer MLP (ReLU) -> sigmoid -> normalised (cx, cy, w, h)."""

    def __init__(self, d_model: int, num_layers: int = 3, out: int = 4):
        super().__init__()
        dims = [d_model] * num_layers + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def mlp(self, x):
        with full_precision(x):
            x = x.float()
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i < len(self.layers) - 1:
                    x = torch.relu(x)
        return x

    def forward(self, x):
        return self.mlp(x).sigmoid()


class TokenHead(nn.Module):
    """Beyond the paper (docs/design.md §5a): a score per fused visual
    token and, with ``box``, at every token a box read relative to its cell, as CenterNet reads
    boxes: ``cx = (col + σ(t_x)) / w``, ``cy = (row + σ(t_y)) / h``, ``(w, h) = σ(t_w, t_h)``.

    ``forward(tokens (B, h·w, d), visual_mask (B, h, w))`` -> scores (B, h·w), padding at
    ``-inf``, and boxes (B, h·w, 4) as normalised (cx, cy, w, h), or None without ``box``.
    """

    def __init__(self, d_model: int, box: bool = True):
        super().__init__()
        self.score = nn.Linear(d_model, 1)
        self.box = BoxHead(d_model, num_layers=2) if box else None

    def forward(self, tokens, visual_mask):
        h, w = visual_mask.shape[-2:]
        with full_precision(tokens):
            scores = self.score(tokens.float()).squeeze(-1).masked_fill(visual_mask.flatten(1), float("-inf"))
            if self.box is None:
                return scores, None
            t = self.box(tokens)
            rows = torch.arange(h, device=t.device, dtype=t.dtype).repeat_interleave(w)
            cols = torch.arange(w, device=t.device, dtype=t.dtype).repeat(h)
            boxes = torch.stack(((cols + t[..., 0]) / w, (rows + t[..., 1]) / h, t[..., 2], t[..., 3]), -1)
        return scores, boxes


def read_boxes(fused, text_len: int, visual_mask, head: BoxHead, token_head: TokenHead | None, use: str) -> dict:
    """The heads on a fused sequence (B, L + h·w, d): ``boxes`` of the head ``use`` ("cls" or
    "token"), ``heads`` (the boxes of each head that has a box), ``token_scores`` and
    ``token_boxes`` (None without a token head)."""
    out = {"heads": {"cls": head(fused[:, 0])}, "token_scores": None, "token_boxes": None}
    if token_head is not None:
        out["token_scores"], out["token_boxes"] = token_head(fused[:, text_len:], visual_mask)
    if out["token_boxes"] is not None:
        best = out["token_scores"].argmax(1)
        out["heads"]["token"] = out["token_boxes"][torch.arange(best.shape[0], device=best.device), best]
    out["boxes"] = out["heads"][use]
    return out
