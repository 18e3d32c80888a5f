"""Visual backbone: ResNet-50 with filter gates and layer gates (docs/design.md §2).

Parameter names follow torchvision's ``resnet50`` (``conv1``, ``bn1``, ``layer1.0.conv1``, …,
``layerK.0.downsample.0``), so torchvision and DETR weights load with strict key checks.

- Filter gates (Eq. 7) multiply ``relu(bn2(conv2(·)))`` of every bottleneck: a closed gate
  removes one conv2 output filter, its bn2 entry and one conv3 input channel.
- Layer gates (Eq. 6) scale the residual branch of the 12 bottlenecks with an identity
  shortcut: ``relu(x + g · bn3(conv3(·)))`` is exactly ``x`` when ``g = 0`` (x ≥ 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lads.errors import LadsError

STAGE_BLOCKS = (3, 4, 6, 3)  # ResNet-50


def norm_scale_shift(mean, var, weight, bias, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm as ``x · scale + shift`` (per channel)."""
    scale = weight * (var + eps).rsqrt()
    return scale, bias - mean * scale


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (DETR's convention)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # torchvision's BN has it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        return norm_scale_shift(self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def fold_norm(weight, bias, scale, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution then ``x · scale + shift`` as one convolution: weight ``W · scale``, bias
    ``shift`` (+ ``scale · b`` for a convolution bias ``b``)."""
    return weight * scale[:, None, None, None], shift if bias is None else shift + scale * bias


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(conv(x))``; a frozen norm is folded into the convolution (:func:`fold_norm`), so
    that it costs no pass over the activations, forward or backward, while the convolution's
    weight still trains."""
    if not isinstance(norm, FrozenBatchNorm2d):
        return norm(conv(x))
    weight, bias = fold_norm(conv.weight, conv.bias, *norm.scale_shift())
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def make_norm(kind: str):
    if kind == "frozen":
        return FrozenBatchNorm2d
    if kind == "batch":
        return nn.BatchNorm2d
    raise LadsError(f"model.visual.norm must be 'frozen' or 'batch', got {kind!r}")


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on conv2) with LADS gates."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, norm=FrozenBatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def has_layer_gate(self) -> bool:
        return self.downsample is None

    def forward(self, x, gate_layer=None, gate_filter=None):
        identity = x if self.downsample is None else conv_norm(*self.downsample, x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_norm(self.conv2, self.bn2, out))
        if gate_filter is not None:  # Eq. 7
            out = out * gate_filter[:, :, None, None].to(out.dtype)
        out = conv_norm(self.conv3, self.bn3, out)
        if gate_layer is not None:  # Eq. 6
            out = out * gate_layer[:, None, None, None].to(out.dtype)
        return self.relu(out + identity)


class VisualBackbone(nn.Module):
    """ResNet-50 topology up to C5 (stride 32, or 16 with ``dilation``); ``width`` = stem width."""

    def __init__(self, width: int = 64, norm: str = "frozen", dilation: bool = False, frozen_stages: int = 1):
        super().__init__()
        norm_layer = make_norm(norm)
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        for stage, num_blocks in enumerate(STAGE_BLOCKS):
            planes = width * 2**stage
            stride, dil = (1, 2) if (dilation and stage == 3) else (1 if stage == 0 else 2, 1)
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), norm_layer(planes * 4)
            )
            # torchvision's replace_stride_with_dilation (DETR's DC5): the first block keeps the
            # previous dilation (1), the following blocks of the stage use the new one
            blocks = [Bottleneck(inplanes, planes, stride, 1, downsample, norm_layer)]
            inplanes = planes * 4
            blocks += [Bottleneck(inplanes, planes, 1, dil, None, norm_layer) for _ in range(num_blocks - 1)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_channels = inplanes
        self._init_weights()
        self.freeze(frozen_stages)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def freeze(self, frozen_stages: int):
        """0: nothing; 1: stem and layer1 (DETR's default); k: stem and layer1..layerk."""
        if frozen_stages == 0:
            return
        stages = [getattr(self, f"layer{i}") for i in range(1, frozen_stages + 1)]
        for module in [self.conv1, self.bn1, *stages]:
            for p in module.parameters():
                p.requires_grad_(False)

    def blocks(self) -> list[tuple[str, Bottleneck]]:
        """The 16 bottlenecks with their torchvision names (``layer1.0`` … ``layer4.2``)."""
        return [
            (f"layer{s}.{i}", block)
            for s in range(1, 5)
            for i, block in enumerate(getattr(self, f"layer{s}"))
        ]

    def forward(self, x, layer_gates=None, filter_gates=None):
        """``layer_gates``/``filter_gates``: lists of 16 per-block gates (None = open)."""
        x = self.maxpool(self.relu(conv_norm(self.conv1, self.bn1, x)))
        for i, (_, block) in enumerate(self.blocks()):
            x = block(
                x,
                None if layer_gates is None else layer_gates[i],
                None if filter_gates is None else filter_gates[i],
            )
        return x


def _read_state_dict(source: str) -> dict:
    if source.startswith(("http://", "https://")):
        from lads.util.download import fetch

        source = str(fetch(source, "model.visual.pretrained"))
    if not Path(source).is_file():
        from lads.models.provenance import where_to_get

        raise LadsError(f"model.visual.pretrained: no file {source}. {where_to_get(source)}")
    try:
        if source.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(source)
        else:  # DETR's and TransVG's training checkpoints also keep their arguments, a Namespace
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused or a corrupt file
        raise LadsError(f"model.visual.pretrained: cannot read {source}: {e}") from None
    for key in ("model", "state_dict"):  # DETR and other training checkpoints
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise LadsError(f"model.visual.pretrained: {source} holds no state dict")
    return obj


def load_visual_weights(backbone: VisualBackbone, source: str) -> None:
    """Load a torchvision-layout ResNet-50 state dict or a DETR checkpoint, strictly."""
    state = _read_state_dict(source)
    detr_prefix = "backbone.0.body."
    if any(k.startswith(detr_prefix) for k in state):
        state = {k[len(detr_prefix):]: v for k, v in state.items() if k.startswith(detr_prefix)}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier
    own = backbone.state_dict()
    if not isinstance(backbone.bn1, nn.BatchNorm2d):
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    else:  # a frozen-norm checkpoint (DETR's) has no batch counts: keep the backbone's
        state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:8]) + (f" … ({len(keys)} in all)" if len(keys) > 8 else "")

        raise LadsError(
            f"{source}: not a ResNet-50 state dict for this backbone; "
            + (f"missing keys: {show(missing)}; " if missing else "")
            + (f"unexpected keys: {show(unexpected)}" if unexpected else "")
        )
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise LadsError(f"{source}: shapes differ from this backbone (width?): {'; '.join(wrong[:4])}")
    backbone.load_state_dict(state, strict=True)


def downsample_mask(pixel_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pad mask (B, H, W), True = padding, at the feature map's resolution (DETR)."""
    return F.interpolate(pixel_mask[:, None].float(), size=size).bool()[:, 0]
