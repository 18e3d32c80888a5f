"""FLOPs: measured with ``FlopCounterMode`` on what actually runs, and counted analytically.

Conventions (those of ``torch.utils.flop_counter``): one multiply-add is 2 FLOPs; only
matrix products are counted — convolutions (``2·B·Cout·Hout·Wout·Cin·k²/groups``, bias not
counted), linear layers and ``mm/bmm`` (``2·m·n·k``, bias not counted) and fused attention
(``QKᵀ`` and ``AV``: ``4·B·heads·Lq·Lk·d_head``). Norms, activations, softmax, pooling and
additions count 0. The ``_scaled_dot_product_flash_attention_for_cpu`` kernel, which
``nn.MultiheadAttention`` uses on CPU, is missing from PyTorch's table; :func:`count_flops`
adds it with the same formula as the GPU kernels, so CPU and GPU counts agree.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import flop_counter



def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of the matrix products that ``fn(*args, **kwargs)`` executes."""
    with torch.inference_mode(), flop_counter.FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_flops(conv: nn.Conv2d, batch: int, h: int, w: int) -> tuple[int, int, int]:
    """(FLOPs, Hout, Wout) of ``conv`` on a (batch, Cin, h, w) input."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    ho, wo = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw)
    flops = 2 * batch * conv.out_channels * ho * wo * (conv.in_channels // conv.groups) * kh * kw
    return flops, ho, wo


def pool_size(pool: nn.MaxPool2d, h: int, w: int) -> tuple[int, int]:
    k, s, p = pool.kernel_size, pool.stride, pool.padding
    return _out_size(h, k, s, p), _out_size(w, k, s, p)


def linear_flops(linear: nn.Linear, rows: int) -> int:
    """``rows`` input vectors through ``linear``: 2·rows·in·out."""
    return 2 * rows * linear.in_features * linear.out_features


def attention_flops(attn: nn.MultiheadAttention, batch: int, length: int) -> int:
    """Self-attention over ``length`` tokens: Q, K, V and output projections, ``QKᵀ`` and ``AV``."""
    d = attn.embed_dim
    projections = 4 * 2 * batch * length * d * d
    return projections + 4 * batch * length * length * d  # Σ over heads of 2·L·L·d_head, twice
