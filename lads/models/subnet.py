"""Real subnets (docs/design.md §3): one expression's hard gates turned into a static module.

The gates depend on the expression alone, so they are known before the image is touched. The
extracted :class:`Subnet` holds copies of only what runs:

- a bottleneck whose layer gate ``g_L`` is 0 is absent (Eq. 6 makes it exactly ``x``);
- closed filter gates (Eq. 7) are sliced out of conv2 (output channels), bn2 and conv3 (input
  channels) with ``index_select``; a bottleneck with every filter closed keeps only its
  shortcut plus the constant its masked branch still adds, ``g_L · bn3(conv3(0)) = bn3 shift``;
- a closed MHSA or FFN sublayer of the fusion module is absent (Eq. 6, pre-norm residual);
- optionally, eval-mode batch norm is folded into the convolution before it.

For any image, ``extract_subnet(model, g)(images, pixel_mask, F_l, mask)`` equals
``model.ground(images, pixel_mask, F_l, mask, g)`` in eval mode to float tolerance.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lads.errors import LadsError
from lads.models.backbone import Bottleneck, FrozenBatchNorm2d, downsample_mask
from lads.models.fusion import GatedEncoderLayer, ModalityInteraction
from lads.models.gating import Gates
from lads.models.lads import check_gates, read_boxes
from lads.util.flops import attention_flops, conv_flops, head_flops, linear_flops, pool_size

# ----------------------------------------------------------------------------- building blocks


def norm_scale_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm as ``x · scale + shift`` (per channel)."""
    if isinstance(norm, FrozenBatchNorm2d):
        return norm.scale_shift()
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    return scale, norm.bias - norm.running_mean * scale


def _new_conv(like: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A conv with ``like``'s geometry and the given (already copied) weights."""
    conv = nn.Conv2d(
        weight.shape[1] * like.groups, weight.shape[0], like.kernel_size, like.stride,
        like.padding, like.dilation, like.groups, bias=bias is not None, device="meta",
    )
    conv.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(bias, requires_grad=False)
    return conv


def _sliced_norm(norm: nn.Module, index: torch.Tensor | None) -> nn.Module:
    out = copy.deepcopy(norm)
    if index is None:
        return out
    for name, t in [*norm.named_parameters(recurse=False), *norm.named_buffers(recurse=False)]:
        if t.dim() == 1:
            sliced = t.detach().index_select(0, index)
            setattr(out, name, nn.Parameter(sliced, requires_grad=False) if isinstance(t, nn.Parameter) else sliced)
    out.num_features = len(index)
    return out


def conv_norm(conv: nn.Conv2d, norm: nn.Module, fold_bn: bool, out_index=None, in_index=None) -> list[nn.Module]:
    """``conv`` then ``norm``, sliced to the kept output/input channels; with ``fold_bn`` one
    conv ``W·scale, bias = shift`` instead."""
    weight = conv.weight.detach()
    if out_index is not None:
        weight = weight.index_select(0, out_index)
    if in_index is not None:
        weight = weight.index_select(1, in_index)
    if not fold_bn:
        return [_new_conv(conv, weight.clone(), None), _sliced_norm(norm, out_index)]
    scale, shift = (t.detach() for t in norm_scale_shift(norm))
    if out_index is not None:
        scale, shift = scale[out_index], shift[out_index]
    return [_new_conv(conv, weight * scale[:, None, None, None], shift.clone())]


class PrunedBottleneck(nn.Module):
    """A bottleneck that runs (``g_L = 1`` or a projection block) with its open filters only.

    ``branch`` = conv1, bn1, relu, conv2[kept], bn2[kept], relu, conv3[:, kept], bn3. With no
    filter open the branch is the constant ``bn3 shift`` (what the masked supernet adds).
    """

    def __init__(self, block: Bottleneck, keep: torch.Tensor, fold_bn: bool):
        super().__init__()
        self.filters = len(keep)  # open filters: conv2's output channels
        self.downsample = None
        if block.downsample is not None:
            self.downsample = nn.Sequential(*conv_norm(block.downsample[0], block.downsample[1], fold_bn))
        self.branch = None
        self.register_buffer("branch_shift", None)
        if len(keep):
            self.branch = nn.Sequential(
                *conv_norm(block.conv1, block.bn1, fold_bn), nn.ReLU(inplace=True),
                *conv_norm(block.conv2, block.bn2, fold_bn, out_index=keep), nn.ReLU(inplace=True),
                *conv_norm(block.conv3, block.bn3, fold_bn, in_index=keep),
            )
        else:
            self.branch_shift = norm_scale_shift(block.bn3)[1].detach().clone()[None, :, None, None]

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.branch_shift if self.branch is None else self.branch(x)
        return torch.relu(out + identity)

    def analytic_flops(self, batch: int, h: int, w: int) -> tuple[int, int, int]:
        """(FLOPs, Hout, Wout) of the convolutions of the shortcut and the branch."""
        flops, h_out, w_out = 0, h, w
        for path in (self.downsample, self.branch):
            if path is None:
                continue
            h_out, w_out = h, w
            for conv in (m for m in path if isinstance(m, nn.Conv2d)):
                f, h_out, w_out = conv_flops(conv, batch, h_out, w_out)
                flops += f
        return flops, h_out, w_out


class FusionSublayer(nn.Module):
    """An open MHSA or FFN sublayer: a copy of just the modules it reads, run by the supernet's
    own ``GatedEncoderLayer.attn_block`` / ``ffn_block``; ``x + F(LN(x))`` (Eq. 6, g = 1)."""

    MODULES = {
        "attn": ("norm1", "self_attn", "dropout1"),
        "ffn": ("norm2", "linear1", "dropout", "linear2", "dropout2"),
    }

    def __init__(self, layer: GatedEncoderLayer, kind: str):
        super().__init__()
        self.kind = kind
        for name in self.MODULES[kind]:
            setattr(self, name, copy.deepcopy(getattr(layer, name)))

    def forward(self, x, pos, key_padding_mask):
        if self.kind == "attn":
            return x + GatedEncoderLayer.attn_block(self, x, pos, key_padding_mask)
        return x + GatedEncoderLayer.ffn_block(self, x)


# ----------------------------------------------------------------------------- the subnet


class Subnet(nn.Module):
    """The static network of one gate pattern: ``(images, pixel_mask, F_l, text_mask)`` -> the
    boxes of ``read_boxes`` (``boxes`` of the inference head, ``heads``, token scores and boxes).

    ``blocks``/``block_names``: the bottlenecks that run; ``sublayers``/``sublayer_names``: the
    fusion sublayers that run. Eval mode only; its parameters do not require grad.
    """

    def __init__(self, model, gates: Gates, fold_bn: bool):
        super().__init__()
        backbone, fusion = model.visual_backbone, model.fusion
        layer_gates, filter_gates, fusion_gates = model.layout.split(gates)
        self.fold_bn = fold_bn
        self.stem = nn.Sequential(
            *conv_norm(backbone.conv1, backbone.bn1, fold_bn), nn.ReLU(inplace=True), copy.deepcopy(backbone.maxpool)
        )
        self.block_names, blocks = [], []
        for (name, block), g_layer, g_filter in zip(backbone.blocks(), layer_gates, filter_gates):
            if g_layer is not None and not bool(g_layer[0]):
                continue  # Eq. 6: relu(x + 0) = x
            keep = g_filter[0].nonzero().flatten().to(block.conv2.weight.device)
            self.block_names.append(name)
            blocks.append(PrunedBottleneck(block, keep, fold_bn))
        self.blocks = nn.ModuleList(blocks)
        self.d_model = fusion.d_model  # read by ModalityInteraction.tokens
        self.visual_proj = copy.deepcopy(fusion.visual_proj)
        self.text_proj = copy.deepcopy(fusion.text_proj)
        self.sublayer_names, sublayers = [], []
        for i, layer in enumerate(fusion.layers):
            for j, kind in enumerate(("attn", "ffn")):
                if bool(fusion_gates[2 * i + j][0]):  # Eq. 6: a closed sublayer is x
                    self.sublayer_names.append(f"fusion.{i}.{kind}")
                    sublayers.append(FusionSublayer(layer, kind))
        self.sublayers = nn.ModuleList(sublayers)
        self.norm = copy.deepcopy(fusion.norm)
        self.head = copy.deepcopy(model.head)
        self.token_head = copy.deepcopy(model.token_head)
        self.use_head = model.config.head
        self.requires_grad_(False)
        self.eval()

    def forward(self, images, pixel_mask, text, text_mask):
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        visual_mask = downsample_mask(pixel_mask, x.shape[-2:])
        x, pos, key_padding_mask = ModalityInteraction.tokens(self, x, visual_mask, text, text_mask)
        for sublayer in self.sublayers:
            x = sublayer(x, pos, key_padding_mask)
        return read_boxes(self.norm(x), text.shape[1], visual_mask, self.head, self.token_head, self.use_head)

    def train(self, mode: bool = True):
        if mode:
            raise LadsError("a Subnet is for inference only; train the supernet instead")
        return super().train(False)

    def analytic_flops(self, batch: int, height: int, width: int, text_len: int) -> dict[str, int]:
        """FLOPs from the layer shapes, by the conventions of ``lads.util.flops``: backbone
        (convs), fusion (projections, MHSA, FFN), head (linears), total."""
        backbone, h, w = conv_flops(self.stem[0], batch, height, width)
        h, w = pool_size(self.stem[-1], h, w)
        for block in self.blocks:
            f, h, w = block.analytic_flops(batch, h, w)
            backbone += f
        tokens = text_len + h * w
        fusion = conv_flops(self.visual_proj, batch, h, w)[0] + linear_flops(self.text_proj, batch * text_len)
        for sublayer in self.sublayers:
            if sublayer.kind == "attn":
                fusion += attention_flops(sublayer.self_attn, batch, tokens)
            else:
                fusion += linear_flops(sublayer.linear1, batch * tokens) + linear_flops(sublayer.linear2, batch * tokens)
        head = head_flops(self.head, self.token_head, batch, batch * h * w)
        return {"backbone": backbone, "fusion": fusion, "head": head, "total": backbone + fusion + head}


def extract_subnet(model, gates: Gates, fold_bn: bool = False) -> Subnet:
    """The subnet of one expression's hard gates (``Gates`` of shape (24,)/(1, 24) and
    (Σc_i,)/(1, Σc_i)); the supernet is left unchanged. docs/design.md §3."""
    if model.training:
        raise LadsError("extract_subnet: the model is in training mode; call model.eval() first")
    if not isinstance(gates, Gates):
        raise LadsError(f"extract_subnet: expected a Gates object, got {type(gates).__name__}")
    gates = gates.map(lambda g: g[None] if torch.is_tensor(g) and g.dim() == 1 else g)
    check_gates(gates, model.layout, 1)
    with torch.no_grad():
        return Subnet(model, gates, fold_bn)


def random_gates(layout, keep: float, batch: int = 1, generator: torch.Generator | None = None) -> Gates:
    """Hard gates with every layer gate and filter gate open with probability ``keep``.

    With the same generator seed the open sets are nested as ``keep`` grows.
    """
    layer = torch.rand(batch, layout.num_layer_gates, generator=generator)
    filt = torch.rand(batch, layout.num_filter_gates, generator=generator)
    return Gates((layer < keep).float(), (filt < keep).float())
