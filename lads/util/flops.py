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


def conv_flops(conv, batch: int, h: int, w: int) -> tuple[int, int, int]:
    """(FLOPs, Hout, Wout) of ``conv`` on a (batch, Cin, h, w) input; ``conv``: anything with
    a ``weight`` (Cout, Cin/groups, kh, kw), ``stride``, ``padding`` and ``dilation`` (an
    ``nn.Conv2d``, a subnet's ``ConvNorm``)."""
    _, _, kh, kw = conv.weight.shape
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    ho, wo = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw)
    return 2 * batch * ho * wo * conv.weight.numel(), ho, wo


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


def head_flops(head, token_head, batch: int, visual_tokens: int) -> int:
    """The ``[CLS]`` box head on ``batch`` rows and, if any, the token head on ``visual_tokens``."""
    flops = sum(linear_flops(layer, batch) for layer in head.layers)
    if token_head is not None:
        flops += linear_flops(token_head.score, visual_tokens)
        if token_head.box is not None:
            flops += sum(linear_flops(layer, visual_tokens) for layer in token_head.box.layers)
    return flops


def gate_costs(model, image_size: int, text_len: int) -> dict[str, torch.Tensor]:
    """The FLOPs of one expression as a linear function of its gates, for ``loss.flops``:
    ``fixed + Σ_b run_b · (block_b + filter_b · Σ_j g_bj) + Σ_k fusion_k · g_k``, where
    ``run_b`` is bottleneck b's layer gate (1 for the 4 projection bottlenecks), ``g_bj`` its
    filter gates and ``g_k`` the fusion sublayer gates. The counts are those of
    ``Subnet.analytic_flops`` at ``image_size`` and ``text_len`` tokens (exact for hard gates,
    but for a bottleneck with every filter closed, whose ``conv1`` no longer runs)."""
    backbone, fusion = model.visual_backbone, model.fusion
    h = w = image_size
    fixed, h, w = conv_flops(backbone.conv1, 1, h, w)
    h, w = pool_size(backbone.maxpool, h, w)
    block, per_filter = [], []
    for _, b in backbone.blocks():
        cost, _, _ = conv_flops(b.conv1, 1, h, w)
        if b.downsample is not None:
            cost += conv_flops(b.downsample[0], 1, h, w)[0]
        conv2, h, w = conv_flops(b.conv2, 1, h, w)
        conv3 = conv_flops(b.conv3, 1, h, w)[0]
        block.append(cost)
        per_filter.append(conv2 / b.conv2.out_channels + conv3 / b.conv3.in_channels)
    tokens = text_len + h * w
    fixed += conv_flops(fusion.visual_proj, 1, h, w)[0] + linear_flops(fusion.text_proj, text_len)
    fixed += head_flops(model.head, model.token_head, 1, h * w)
    sublayers = []
    for layer in fusion.layers:
        sublayers.append(attention_flops(layer.self_attn, 1, tokens))
        sublayers.append(linear_flops(layer.linear1, tokens) + linear_flops(layer.linear2, tokens))
    as_tensor = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return {"fixed": as_tensor(float(fixed)), "block": as_tensor(block), "filter": as_tensor(per_filter),
            "fusion": as_tensor(sublayers)}
