"""Real subnets (docs/design.md §3): one expression's hard gates turned into a static module.

The gates depend on the expression alone, so they are known before the image is touched. The
extracted :class:`Subnet` runs only what its gates open, and shares every tensor it does not
prune with the supernet; only sliced tensors are new:

- a bottleneck whose layer gate ``g_L`` is 0 is absent (Eq. 6 makes it exactly ``x``);
- closed filter gates (Eq. 7) are sliced out of conv2 (output channels), bn2 and conv3 (input
  channels) with ``index_select``; a bottleneck with every filter closed keeps only its
  shortcut plus the constant its masked branch still adds, ``g_L · bn3(conv3(0)) = bn3 shift``;
  a bottleneck with every filter open is the supernet's own tensors;
- a closed MHSA or FFN sublayer of the fusion module is absent (Eq. 6, pre-norm residual); an
  open one is the supernet's own modules;
- optionally, eval-mode batch norm is folded into the convolution before it. Folded weights are
  new tensors; a :class:`BackbonePlan` folds each convolution once and is shared by every
  subnet extracted from it (``SubnetRunner`` keeps one per version of the weights).

For any image, ``extract_subnet(model, g)(images, pixel_mask, F_l, mask)`` equals
``model.ground(images, pixel_mask, F_l, mask, g)`` in eval mode to float tolerance. A subnet
lives on its supernet's device and in its dtype: move or cast the supernet, then extract.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from lads.errors import LadsError
from lads.models.backbone import downsample_mask, fold_norm, norm_scale_shift
from lads.models.checks import check_gates
from lads.models.fusion import FUSION_SUBLAYERS, attn_block, ffn_block, input_sequence
from lads.models.gating import Gates
from lads.models.heads import read_boxes
from lads.util.flops import attention_flops, conv_flops, head_flops, linear_flops, pool_size

# ----------------------------------------------------------------------------- building blocks


class ConvNorm:
    """A convolution and the eval-mode batch norm after it, as plain tensors: the supernet's own
    (:meth:`of`), with the norm folded in (:meth:`folded`: ``W·scale``, bias ``shift``), or
    sliced to kept channels (:meth:`sliced`). ``norm`` is ``(mean, var, weight, bias, eps)``, or
    None once folded. ``new_bytes``: the bytes of the tensors made for it (0 when shared)."""

    __slots__ = ("weight", "bias", "norm", "stride", "padding", "dilation", "new_bytes")

    def __init__(self, weight, bias, norm, stride, padding, dilation, new_bytes=0):
        self.weight, self.bias, self.norm = weight, bias, norm
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.new_bytes = new_bytes

    @classmethod
    def of(cls, conv: nn.Conv2d, norm: nn.Module) -> "ConvNorm":
        """``conv`` then ``norm`` (``BatchNorm2d`` in eval mode or ``FrozenBatchNorm2d``), shared."""
        stats = (norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)
        return cls(conv.weight, conv.bias, stats, conv.stride, conv.padding, conv.dilation)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode batch norm as ``x · scale + shift`` (per channel)."""
        return norm_scale_shift(*self.norm)

    def folded(self, memory_format=torch.contiguous_format, dtype=None) -> "ConvNorm":
        """One convolution: ``W · scale`` and bias ``shift`` (+ ``scale · b`` for a conv bias),
        computed in the weights' dtype and stored in ``dtype`` (that of autocast, if any)."""
        if self.norm is None:
            return self
        weight, bias = fold_norm(self.weight, self.bias, *self.scale_shift())
        bias = bias.to(dtype)
        weight = weight.to(dtype).contiguous(memory_format=memory_format)
        return ConvNorm(weight, bias, None, self.stride, self.padding, self.dilation,
                        weight.nbytes + bias.nbytes)

    def sliced(self, out_index=None, in_index=None, memory_format=torch.contiguous_format) -> "ConvNorm":
        """The kept output channels (weight rows, bias, norm) and/or input channels (weight columns)."""
        weight, bias, norm = self.weight, self.bias, self.norm
        made = []
        if out_index is not None:
            weight = weight.index_select(0, out_index)
            bias = None if bias is None else bias.index_select(0, out_index)
            if norm is not None:
                norm = (*(t.index_select(0, out_index) for t in norm[:4]), norm[4])
                made += norm[:4]
            made.append(bias)
        if in_index is not None:
            weight = weight.index_select(1, in_index)
        weight = weight.contiguous(memory_format=memory_format)
        made.append(weight)
        return ConvNorm(weight, bias, norm, self.stride, self.padding, self.dilation,
                        sum(t.nbytes for t in made if t is not None))

    def constant(self) -> torch.Tensor:
        """What the layer outputs for an input of zeros: the norm's shift, or the folded bias."""
        out = self.scale_shift()[1] if self.norm is not None else self.bias
        return (torch.zeros(self.weight.shape[0], dtype=self.weight.dtype, device=self.weight.device)
                if out is None else out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if self.norm is not None:
            mean, var, weight, bias, eps = self.norm
            x = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        return x

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]


class BackbonePlan:
    """The supernet's visual backbone as :class:`ConvNorm` s, to extract subnets from: shared
    tensors, or (``fold_bn``) each convolution folded once, when a subnet first needs it, in
    ``memory_format`` and ``dtype`` (that of the autocast the subnets will run under)."""

    def __init__(self, backbone, fold_bn: bool, memory_format=torch.contiguous_format, dtype=None):
        self.fold_bn, self.memory_format, self.dtype = fold_bn, memory_format, dtype
        self.pool = backbone.maxpool
        self._shared = {"stem": ConvNorm.of(backbone.conv1, backbone.bn1)}
        self.blocks = []  # (name, has a layer gate, downsample key or None)
        for name, b in backbone.blocks():
            for i, (conv, norm) in enumerate(((b.conv1, b.bn1), (b.conv2, b.bn2), (b.conv3, b.bn3))):
                self._shared[f"{name}.{i + 1}"] = ConvNorm.of(conv, norm)
            if b.downsample is not None:
                self._shared[f"{name}.down"] = ConvNorm.of(*b.downsample)
            self.blocks.append((name, b.downsample is None, b.downsample is not None))
        self._folded: dict[str, ConvNorm] = {}

    def __getitem__(self, key: str) -> ConvNorm:
        if not self.fold_bn:
            return self._shared[key]
        if key not in self._folded:
            self._folded[key] = self._shared[key].folded(self.memory_format, self.dtype)
        return self._folded[key]

    def pruned(self, name: str, keep: torch.Tensor, downsample: bool) -> "PrunedBottleneck":
        """Bottleneck ``name`` with the filters ``keep`` (indices of conv2's output channels)."""
        conv1, conv2, conv3 = (self[f"{name}.{i}"] for i in (1, 2, 3))
        shortcut = self[f"{name}.down"] if downsample else None
        if len(keep) == conv2.out_channels:
            return PrunedBottleneck(shortcut, (conv1, conv2, conv3), None)
        if len(keep) == 0:
            return PrunedBottleneck(shortcut, None, conv3.constant()[None, :, None, None])
        sliced = (conv1, conv2.sliced(out_index=keep, memory_format=self.memory_format),
                  conv3.sliced(in_index=keep, memory_format=self.memory_format))
        return PrunedBottleneck(shortcut, sliced, None)


class PrunedBottleneck:
    """A bottleneck that runs (``g_L = 1`` or a projection block) with its open filters only:
    ``relu(shortcut(x) + branch(x))``, ``branch`` = conv1·bn1, relu, conv2·bn2 [kept], relu,
    conv3[:, kept]·bn3. With no filter open the branch is the constant ``bn3 shift`` (what the
    masked supernet adds)."""

    __slots__ = ("downsample", "branch", "branch_shift")

    def __init__(self, downsample, branch, branch_shift):
        self.downsample, self.branch, self.branch_shift = downsample, branch, branch_shift

    @property
    def filters(self) -> int:
        """Open filters: conv2's output channels."""
        return 0 if self.branch is None else self.branch[1].out_channels

    @property
    def new_bytes(self) -> int:
        made = 0 if self.branch_shift is None else self.branch_shift.nbytes
        return made + sum(c.new_bytes for c in self.branch or ())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        if self.branch is None:
            return torch.relu(identity + self.branch_shift)
        conv1, conv2, conv3 = self.branch
        out = F.relu(conv2(F.relu(conv1(x), inplace=True)), inplace=True)
        return F.relu(conv3(out) + identity, inplace=True)

    def analytic_flops(self, batch: int, h: int, w: int) -> tuple[int, int, int]:
        """(FLOPs, Hout, Wout) of the convolutions of the shortcut and the branch."""
        flops, h_out, w_out = 0, h, w
        for path in ((self.downsample,), self.branch):
            if path is None or path[0] is None:
                continue
            h_out, w_out = h, w
            for conv in path:
                f, h_out, w_out = conv_flops(conv, batch, h_out, w_out)
                flops += f
        return flops, h_out, w_out


class FusionSublayer(nn.Module):
    """An open MHSA or FFN sublayer, ``x + F(LN(x))`` (Eq. 6, g = 1): the supernet's own modules
    (``FUSION_SUBLAYERS[kind]``), shared, through the functions the supernet's layer calls."""

    def __init__(self, layer: nn.Module, kind: str):
        super().__init__()
        self.kind = kind
        for name in FUSION_SUBLAYERS[kind]:
            self._modules[name] = getattr(layer, name)

    def forward(self, x, pos, key_padding_mask):
        if self.kind == "attn":
            return x + attn_block(self, x, pos, key_padding_mask)
        return x + ffn_block(self, x)


# ----------------------------------------------------------------------------- the subnet


class Subnet(nn.Module):
    """The static network of one gate pattern: ``(images, pixel_mask, F_l, text_mask[,
    image_index])`` -> the boxes of ``read_boxes`` (``boxes`` of the inference head, ``heads``, token scores and boxes).

    ``blocks``/``block_names``: the bottlenecks that run, ``block_keys``: each one's name and
    kept filters (two subnets whose keys agree up to k compute the same first k blocks);
    ``sublayers``/``sublayer_names``: the
    fusion sublayers that run; ``gates``: the pattern (CPU); ``new_bytes``: the bytes of the
    tensors extraction made (the rest is the supernet's). Eval mode only.
    """

    def __init__(self, model, gates: Gates, plan: BackbonePlan):
        super().__init__()
        self.__dict__["supernet"] = model  # not a submodule: the weights are the supernet's
        self._tensors = subnet_tensors(model)
        self.gates = gates.map(lambda g: g.detach().to("cpu", torch.bool))
        self._build(plan)

    def _build(self, plan: BackbonePlan):
        """Slice (and fold) the supernet's current weights; remember their version."""
        model, fusion = self.supernet, self.supernet.fusion
        self._version = weights_version(self._tensors)
        layer_gates, filter_gates, fusion_gates = model.layout.split(self.gates)
        self.fold_bn, self._plan_format = plan.fold_bn, (plan.memory_format, plan.dtype)
        self.stem, self.pool = plan["stem"], plan.pool
        self.block_names, self.block_keys, self.blocks = [], [], []
        device = plan["stem"].weight.device
        for (name, has_layer_gate, downsample), g_layer, g_filter in zip(plan.blocks, layer_gates, filter_gates):
            if has_layer_gate and not bool(g_layer[0]):
                continue  # Eq. 6: relu(x + 0) = x
            keep = g_filter[0].nonzero().flatten()
            self.block_names.append(name)
            self.block_keys.append((name, keep.numpy().tobytes()))
            self.blocks.append(plan.pruned(name, keep.to(device), downsample))
        self.d_model = fusion.d_model  # read by input_sequence
        self.visual_proj, self.text_proj = fusion.visual_proj, fusion.text_proj
        self.sublayer_names, sublayers = [], []
        for i, layer in enumerate(fusion.layers):
            for j, kind in enumerate(("attn", "ffn")):
                if bool(fusion_gates[2 * i + j][0]):  # Eq. 6: a closed sublayer is x
                    self.sublayer_names.append(f"fusion.{i}.{kind}")
                    sublayers.append(FusionSublayer(layer, kind))
        self.sublayers = nn.ModuleList(sublayers)
        self.norm, self.head, self.token_head = fusion.norm, model.head, model.token_head
        self.use_head = model.config.head
        self.new_bytes = sum(b.new_bytes for b in self.blocks)
        self.training = False

    def forward(self, images, pixel_mask, text, text_mask, image_index=None):
        """``image_index`` (B,): row i grounds expression i on image ``image_index[i]``, so that
        the visual backbone runs once per image (default: image i)."""
        self.refresh()
        return self.fuse(self.backbone(images), pixel_mask, text, text_mask, image_index)

    def refresh(self):
        """Extract again if the supernet was trained or reloaded since."""
        if weights_version(self._tensors) != self._version:
            self._build(BackbonePlan(self.supernet.visual_backbone, self.fold_bn, *self._plan_format))

    def stem_forward(self, images):
        return self.pool(F.relu(self.stem(images), inplace=True))

    def backbone(self, images):
        """The visual features of the open bottlenecks."""
        x = self.stem_forward(images)
        for block in self.blocks:
            x = block(x)
        return x

    def fuse(self, x, pixel_mask, text, text_mask, image_index=None):
        """The fusion sublayers and heads on visual features ``x`` (N, C, h, w) of the images of
        ``pixel_mask`` (N, H, W); row i of the text reads image ``image_index[i]``."""
        visual_mask = downsample_mask(pixel_mask, x.shape[-2:])
        if image_index is not None:
            x, visual_mask = x[image_index], visual_mask[image_index]
        x, pos, key_padding_mask = input_sequence(self, x, visual_mask, text, text_mask)
        for sublayer in self.sublayers:
            x = sublayer(x, pos, key_padding_mask)
        return read_boxes(self.norm(x), text.shape[1], visual_mask, self.head, self.token_head, self.use_head)

    def train(self, mode: bool = True):
        if mode:
            raise LadsError("a Subnet is for inference only; train the supernet instead")
        return self  # its modules are the supernet's, in eval mode since extraction

    def _apply(self, fn, recurse=True):
        raise LadsError("a Subnet shares its supernet's weights: move or cast the supernet, then extract again")

    def analytic_flops(self, batch: int, height: int, width: int, text_len: int) -> dict[str, int]:
        """FLOPs from the layer shapes, by the conventions of ``lads.util.flops``: backbone
        (convs), fusion (projections, MHSA, FFN), head (linears), total."""
        backbone, h, w = conv_flops(self.stem, batch, height, width)
        h, w = pool_size(self.pool, h, w)
        for block in self.blocks:
            f, h, w = block.analytic_flops(batch, h, w)
            backbone += f
        tokens = text_len + h * w
        fusion = conv_flops(self.visual_proj, batch, h, w)[0] + linear_flops(self.text_proj, batch * text_len)
        for sublayer in self.sublayers:
            if sublayer.kind == "attn":
                fusion += attention_flops(sublayer.self_attn, batch, tokens)
            else:
                fusion += (linear_flops(sublayer.linear1, batch * tokens)
                           + linear_flops(sublayer.linear2, batch * tokens))
        head = head_flops(self.head, self.token_head, batch, batch * h * w)
        return {"backbone": backbone, "fusion": fusion, "head": head, "total": backbone + fusion + head}


def shared_backbones(subnets: list[Subnet], images: torch.Tensor, used: list[torch.Tensor]) -> list[torch.Tensor]:
    """The visual features of each subnet on its images (``used[s]``: sorted indices into
    ``images``), with what subnets share computed once: the stem on every image, and each
    bottleneck once per image and sequence of bottlenecks before it (a prefix tree over
    ``block_keys``). Equals ``[s.backbone(images[u]) for s, u in zip(subnets, used)]``; the
    subnets come from one ``BackbonePlan``, hence share the stem."""
    out: list[torch.Tensor | None] = [None] * len(subnets)

    def descend(members: list[int], depth: int, x: torch.Tensor, have: torch.Tensor):
        children: dict = {}
        for s in members:
            if len(subnets[s].block_keys) == depth:
                out[s] = x[torch.searchsorted(have, used[s])]
            else:
                children.setdefault(subnets[s].block_keys[depth], []).append(s)
        for group in children.values():
            need = torch.unique(torch.cat([used[s] for s in group]))
            rows = x if len(need) == len(have) else x[torch.searchsorted(have, need)]
            descend(group, depth + 1, subnets[group[0]].blocks[depth](rows), need)

    for subnet in subnets:
        subnet.refresh()
    have = torch.unique(torch.cat(used))
    descend(list(range(len(subnets))), 0, subnets[0].stem_forward(images[have]), have)
    return out


def extract_subnet(model, gates: Gates, fold_bn: bool = False, plan: BackbonePlan | None = None) -> Subnet:
    """The subnet of one expression's hard gates (``Gates`` of shape (24,)/(1, 24) and
    (Σc_i,)/(1, Σc_i)); the supernet is left unchanged. ``plan``: a :class:`BackbonePlan` of
    ``model`` to reuse (its ``fold_bn`` then decides). docs/design.md §3."""
    if model.training:
        raise LadsError("extract_subnet: the model is in training mode; call model.eval() first")
    if not isinstance(gates, Gates):
        raise LadsError(f"extract_subnet: expected a Gates object, got {type(gates).__name__}")
    gates = gates.map(lambda g: g[None] if torch.is_tensor(g) and g.dim() == 1 else g)
    check_gates(gates, model.layout, 1)
    with torch.no_grad():
        return Subnet(model, gates, plan or BackbonePlan(model.visual_backbone, fold_bn))


def random_gates(layout, keep: float, batch: int = 1, generator: torch.Generator | None = None) -> Gates:
    """Hard gates with every layer gate and filter gate open with probability ``keep``.

    With the same generator seed the open sets are nested as ``keep`` grows.
    """
    layer = torch.rand(batch, layout.num_layer_gates, generator=generator)
    filt = torch.rand(batch, layout.num_filter_gates, generator=generator)
    return Gates((layer < keep).float(), (filt < keep).float())


def subnet_tensors(model) -> list[torch.Tensor]:
    """Every parameter and buffer a subnet may read: visual backbone, fusion, heads."""
    modules = [model.visual_backbone, model.fusion, model.head, model.token_head]
    return [t for m in modules if m is not None for t in itertools.chain(m.parameters(), m.buffers())]


class _OptimizerSteps:
    """Counts the steps of every ``torch.optim`` optimizer in this process (a global post-step
    hook): fused optimizers (``AdamW(fused=True)``) write the weights without incrementing
    their version counters."""

    count = 0

    @classmethod
    def hook(cls, optimizer, args, kwargs):
        cls.count += 1


register_optimizer_step_post_hook(_OptimizerSteps.hook)


def weights_version(tensors: list[torch.Tensor]) -> tuple:
    """Identifies the values of ``tensors``: the optimizer steps taken in this process, and each
    tensor's address and version counter, which in-place writes (an unfused optimizer step,
    ``load_state_dict``, ``copy_``) increment and moving a module changes. In-place writes
    through ``tensor.data``, which autograd does not see either, are not counted: call
    ``SubnetRunner.clear()`` after them, and after writes to inference tensors (made under
    ``torch.inference_mode``), which have no version counter."""
    return _OptimizerSteps.count, tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)
