"""Modality interaction module: ``[text tokens; visual tokens]`` through M gated encoder layers.

Each layer is pre-norm with two gated residual sublayers (Eq. 6):
``x + g_attn · MHSA(LN(x))`` and ``x + g_ffn · FFN(LN(x))``; a closed gate is an exact identity.
Visual tokens carry 2-D sine positional embeddings: added to the tokens themselves (the paper:
"flattened ... and added with the sinusoidal positional embeddings"), so that the values the
``[CLS]`` token gathers hold positions, and again to queries and keys in every layer (DETR,
TransVG).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def sine_position_embedding(mask: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """2-D sine embedding (DETR) of the cells of a (B, h, w) grid -> (B, h·w, dim).

    Positions are fractions of the padded square, ``2π·(i + 1)/h``, the frame in which boxes
    are normalised. (DETR divides by the unpadded extent because its boxes are fractions of the
    unpadded image; with letterboxed inputs and square-normalised boxes that would give the same
    cell a different position in every image of another aspect ratio.)
    """
    b, h, w = mask.shape
    scale = 2 * math.pi
    y = (torch.arange(1, h + 1, device=mask.device, dtype=torch.float32) / h * scale)[:, None].expand(h, w)
    x = (torch.arange(1, w + 1, device=mask.device, dtype=torch.float32) / w * scale)[None, :].expand(h, w)
    half = dim // 2
    freq = temperature ** (2 * (torch.arange(half, device=mask.device) // 2) / half)
    px, py = x[..., None] / freq, y[..., None] / freq
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=3).flatten(2)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=3).flatten(2)
    return torch.cat((py, px), dim=2).flatten(0, 1)[None].expand(b, h * w, dim)


def attention_backend(x: torch.Tensor):
    """On CPU in bf16, the explicit (math) attention: the fused CPU kernel's backward is ~3×
    slower there (26 vs 10 ms for 32 × 4 heads × 73 tokens, benchmarks/README.md)."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


FUSION_SUBLAYERS = {  # the modules each gated sublayer of a GatedEncoderLayer reads
    "attn": ("norm1", "self_attn", "dropout1"),
    "ffn": ("norm2", "linear1", "dropout", "linear2", "dropout2"),
}


def attn_block(m, x, pos, key_padding_mask):
    """``MHSA(LN(x))`` of Eq. 6, positions added to queries and keys, for a module ``m`` holding
    ``FUSION_SUBLAYERS["attn"]`` (a ``GatedEncoderLayer`` or an extracted sublayer)."""
    h = m.norm1(x)
    q = k = h + pos
    with attention_backend(h):
        h = m.self_attn(q, k, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
    return m.dropout1(h)


def ffn_block(m, x):
    """``FFN(LN(x))`` of Eq. 6 for a module ``m`` holding ``FUSION_SUBLAYERS["ffn"]``."""
    return m.dropout2(m.linear2(m.dropout(F.relu(m.linear1(m.norm2(x))))))


def input_sequence(m, visual, visual_mask, text, text_mask):
    """The fusion's input ``[text tokens; visual tokens]`` with positions added, its positional
    embedding and its key-padding mask, for a module ``m`` holding ``visual_proj``, ``text_proj``
    and ``d_model`` (a ``ModalityInteraction`` or an extracted subnet)."""
    v = m.visual_proj(visual).flatten(2).transpose(1, 2)
    x = torch.cat((m.text_proj(text), v), dim=1)
    pos = torch.cat((torch.zeros_like(x[:, : text.shape[1]]), sine_position_embedding(visual_mask, m.d_model)), dim=1)
    key_padding_mask = torch.cat((~text_mask, visual_mask.flatten(1)), dim=1)
    return x + pos, pos, key_padding_mask


class GatedEncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer whose MHSA and FFN residuals are gated (Eq. 6)."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x, pos, key_padding_mask, gate_attn=None, gate_ffn=None):
        h = attn_block(self, x, pos, key_padding_mask)
        x = x + (h if gate_attn is None else gate_attn[:, None, None].to(h.dtype) * h)
        h = ffn_block(self, x)
        return x + (h if gate_ffn is None else gate_ffn[:, None, None].to(h.dtype) * h)


class ModalityInteraction(nn.Module):
    """Projects both modalities to ``d_model`` and fuses them."""

    def __init__(self, visual_dim, text_dim, d_model, num_layers, num_heads, ffn_dim, dropout):
        super().__init__()
        self.d_model = d_model
        self.visual_proj = nn.Conv2d(visual_dim, d_model, 1)
        self.text_proj = nn.Linear(text_dim, d_model)
        self.layers = nn.ModuleList(
            GatedEncoderLayer(d_model, num_heads, ffn_dim, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, visual, visual_mask, text, text_mask, gates=None, every_layer: bool = False):
        """The fused sequence ``[text tokens; visual tokens]`` after the final LayerNorm, and,
        with ``every_layer``, the normalised ``[CLS]`` of each earlier layer (deep supervision).

        ``gates``: a list of 2·M per-sublayer gates (attn, ffn, attn, …), or None (open).
        """
        x, pos, key_padding_mask = input_sequence(self, visual, visual_mask, text, text_mask)
        earlier = []
        for i, layer in enumerate(self.layers):
            g_attn, g_ffn = (None, None) if gates is None else (gates[2 * i], gates[2 * i + 1])
            x = layer(x, pos, key_padding_mask, g_attn, g_ffn)
            if every_layer and i < len(self.layers) - 1:
                earlier.append(self.norm(x[:, 0]))
        return self.norm(x), earlier
