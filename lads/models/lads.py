"""The LADS supernet: visual and text backbones, gating network, modality interaction, head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lads.config import Config, ModelConfig, load_config
from lads.errors import LadsError
from lads.models.backbone import VisualBackbone, downsample_mask, load_visual_weights
from lads.models.fusion import ModalityInteraction
from lads.models.gating import GateLayout, Gates, GatingNetwork, binary_gates, straight_through
from lads.models.losses import expected_flops, lads_loss
from lads.models.text import TextBackbone
from lads.util.amp import full_precision
from lads.util.flops import gate_costs


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


class LADS(nn.Module):
    """Language Adaptive Dynamic Subnets. ``config.dense`` forces every gate open."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        v, t, f, g = config.visual, config.text, config.fusion, config.gating
        self.visual_backbone = VisualBackbone(v.width, v.norm, v.dilation, v.frozen_stages)
        if v.pretrained:
            load_visual_weights(self.visual_backbone, v.pretrained)
        self.text_backbone = TextBackbone(t.name, t.num_layers, t.pretrained, t.frozen)
        self.fusion = ModalityInteraction(
            self.visual_backbone.num_channels, self.text_backbone.hidden_size,
            f.d_model, f.num_layers, f.num_heads, f.ffn_dim, f.dropout,
        )
        self.head = BoxHead(f.d_model)
        check_heads(config)
        w = config.loss
        self.token_head = TokenHead(f.d_model, box=w.token_box > 0) if w.token or w.token_box else None
        self.layout = GateLayout.for_model(self.visual_backbone.blocks(), f.num_layers)
        if g.granularity not in ("batch", "element"):
            raise LadsError(f"model.gating.granularity must be 'batch' or 'element', got {g.granularity!r}")
        for key in ("layer_drop_fusion", "layer_drop_visual", "filter_drop"):
            p = getattr(config, key)
            if not 0 <= p < 1:
                raise LadsError(f"model.{key} must be a probability from 0 to below 1, got {p!r}")
            if p and not config.dense:
                raise LadsError(f"model.{key} is for the dense network (model.dense=true); a LADS "
                                "model's own gates skip its layers and filters")
        self.gating = None if config.dense else GatingNetwork(
            self.layout, self.text_backbone.hidden_size, g.hidden, g.bias_init, g.static
        )

    # ------------------------------------------------------------------ stages of forward

    def encode_text(self, input_ids, attention_mask):
        """F_l and its mask: the first stage, before any pixel is touched."""
        return self.text_backbone(input_ids, attention_mask)

    def gates(self, text, text_mask, n_s: float | None = None):
        """Gates, soft gates, relevance scores and α for a batch of expressions (Eqs. 1-5);
        ``n_s``: Eq. 5's soft/hard draw (training; default: one drawn for this batch)."""
        relevance, alpha = self.gating(text, text_mask)
        gates, soft = binary_gates(relevance, self.training, self.config.gating.granularity, n_s)
        return gates, soft, relevance, alpha

    def ground(self, images, pixel_mask, text, text_mask, gates: Gates | None) -> dict:
        """The REC supernet with the given gates (None: every gate open).

        Returns ``boxes`` (B, 4) of the inference head (``model.head``), ``heads`` (the boxes of
        each head), ``token_scores``/``token_boxes`` (the token head's, or None), ``grid`` (h, w)
        and, while training with ``loss.deep``, ``deep_boxes`` of the earlier fusion layers.
        """
        layer_gates = filter_gates = fusion_gates = None
        if gates is not None:
            layer_gates, filter_gates, fusion_gates = self.layout.split(gates)
        visual = self.visual_backbone(images, layer_gates, filter_gates)
        visual_mask = downsample_mask(pixel_mask, visual.shape[-2:])
        deep = self.training and self.config.loss.deep > 0
        fused, earlier = self.fusion(visual, visual_mask, text, text_mask, fusion_gates, every_layer=deep)
        out = read_boxes(fused, text.shape[1], visual_mask, self.head, self.token_head, self.config.head)
        out["deep_boxes"] = [self.head(x) for x in earlier]
        out["grid"] = tuple(visual.shape[-2:])
        return out

    def forward(self, images, pixel_mask, input_ids, attention_mask, gates: Gates | None = None,
                n_s: float | None = None):
        """Boxes as normalised (cx, cy, w, h) of the padded square, with the gates used and the
        outputs of :meth:`ground`.

        ``gates`` forces hard gates (tests, analysis); by default the gating network decides.
        ``n_s``: Eq. 5's soft/hard draw in training (the engine gives one per optimizer step).
        """
        check_inputs(images, pixel_mask, input_ids, attention_mask)
        text, text_mask = self.encode_text(input_ids, attention_mask)
        out = {"gates": gates, "soft": None, "relevance": None, "alpha": None}
        if gates is None and self.gating is not None:
            out["gates"], out["soft"], out["relevance"], out["alpha"] = self.gates(text, text_mask, n_s)
            if self.training:  # the FLOPs of the evaluation's gates 1[r ≥ 0], for loss.flops
                hard = out["relevance"].map(straight_through)
                out["flops"] = expected_flops(hard, self.layout, self.gate_costs())
        elif gates is not None:
            check_gates(gates, self.layout, images.shape[0])
        elif self.training and (self.config.layer_drop_fusion or self.config.layer_drop_visual
                                or self.config.filter_drop):
            out["gates"] = self.layer_drop(images.shape[0], images.device)
        out.update(self.ground(images, pixel_mask, text, text_mask, out["gates"]))
        return out

    def layer_drop(self, batch: int, device) -> Gates:
        """LayerDrop (Fan et al., ICLR 2020) for the dense network in training: each fusion
        sublayer is skipped with probability ``model.layer_drop_fusion``, each gated visual
        bottleneck with ``model.layer_drop_visual``, and each filter with ``model.filter_drop``,
        independently per expression. A network trained so still works with layers and filters
        removed, which is what the gates of a LADS model started from it will do (docs/design.md
        §5a, §5c)."""
        c = self.config
        p = torch.tensor([c.layer_drop_visual if owner < self.layout.num_visual else c.layer_drop_fusion
                          for owner in self.layout.layer_owner], device=device)
        keep = torch.rand(batch, self.layout.num_layer_gates, device=device) >= p
        filters = torch.rand(batch, self.layout.num_filter_gates, device=device) >= c.filter_drop
        return Gates(keep.float(), filters.float())

    def gate_costs(self, text_len: int = 10) -> dict:
        """FLOPs as a linear function of the gates at ``image_size`` and ``text_len`` tokens
        (``lads.util.flops.gate_costs``; training uses 10), computed once per length."""
        cache = self.__dict__.setdefault("_gate_costs", {})
        if text_len not in cache:
            cache[text_len] = gate_costs(self, self.config.image_size, text_len)
        return cache[text_len]

    def subnet_flops(self, gates: Gates | None, j: int, text_len: int) -> float:
        """FLOPs of expression ``j``'s subnet as a fraction of the dense network's, at
        ``text_len`` tokens (1 for ``None`` or a dense model)."""
        if gates is None or self.gating is None:
            return 1.0
        one = gates.map(lambda g: g[j : j + 1].float().cpu())
        return expected_flops(one, self.layout, self.gate_costs(text_len)).item()

    def extract_subnet(self, gates: Gates, fold_bn: bool = False):
        """The static subnet of one expression's hard gates (docs/design.md §3), eval mode only.

        >>> subnet = model.eval().extract_subnet(gates)  # then subnet(images, pixel_mask, F_l, mask)
        """
        from lads.models.subnet import extract_subnet

        return extract_subnet(self, gates, fold_bn)

    def loss(self, outputs, target_boxes):
        """Eq. 9 on the outputs of ``forward``, plus the training-only terms of ``loss``."""
        return lads_loss(outputs, target_boxes, self.config.loss)

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, revision: str | None = None, cache_dir=None) -> "LADS":
        """A trained model in eval mode, from a checkpoint folder (``lads train`` and
        :meth:`save_pretrained` write them) or a Hugging Face Hub id (``org/name``, at ``revision``;
        the local Hub cache only when ``HF_HUB_OFFLINE`` is set).

        Args:
            name_or_path: a checkpoint folder, a run folder holding ``checkpoint/``, or a Hub id.
            device: where to put the model (default: CPU).
            revision: a Hub branch, tag or commit.
            cache_dir: the Hub cache (default: ``HF_HUB_CACHE``).
        """
        from lads.util.checkpoint import load_model
        from lads.util.hub import resolve_pretrained

        return load_model(resolve_pretrained(name_or_path, revision, cache_dir), device)[0]

    def save_pretrained(self, folder) -> Path:
        """Write this model as a checkpoint folder to share (weights, config, meta, tokenizer,
        model card; no optimizer state); :meth:`from_pretrained` reads it."""
        from lads.util.checkpoint import save_pretrained

        return save_pretrained(self, folder)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload :meth:`save_pretrained`'s folder to the Hugging Face Hub as ``repo_id``."""
        from lads.util.hub import push_to_hub

        return push_to_hub(self, repo_id, private, token)

    def predict(self, image, expressions, mode: str = "subnet", dtype: str = "fp32") -> list[dict]:
        """Boxes in original image pixels for one image and one or more expressions; ``dtype``
        fp32, or bf16/fp16 autocast."""
        from lads.inference import predict
        from lads.util.amp import DTYPES

        if dtype not in DTYPES:
            raise LadsError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return predict(self, image, expressions, mode, tokenizer=self.tokenizer, amp=DTYPES[dtype])

    def predict_many(self, queries, batch_size: int = 64, num_workers: int | None = None, mode: str = "subnet",
                     dtype: str = "fp32"):
        """Answers for many images, each with its expressions, in input order: an iterator of
        dicts (``lads.batch.predict_many``; ``queries``: ``(image, expressions)`` pairs, dicts
        ``{"image", "expressions"}``, or ``lads.batch``'s JSON-lines and folder readers)."""
        from lads.batch import predict_many
        from lads.util.amp import DTYPES

        if dtype not in DTYPES:
            raise LadsError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return predict_many(self, queries, batch_size, num_workers, mode, DTYPES[dtype])

    def prepare(self, image, expressions) -> dict:
        """``images``, ``pixel_mask``, ``input_ids``, ``attention_mask`` for one image (a path or
        a PIL image) and its expressions, on the model's device: ``model(**model.prepare(…))``."""
        from lads.inference import prepare_inputs

        device = next(self.parameters()).device
        inputs, _ = prepare_inputs(image, expressions, self.config, self.tokenizer)
        return {k: v.to(device) for k, v in inputs.items()}

    @property
    def tokenizer(self):
        """The tokenizer of the text backbone (loaded once)."""
        if getattr(self, "_tokenizer", None) is None:
            from lads.models.text import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.text.name)
        return self._tokenizer

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.named_children()}


def check_inputs(images, pixel_mask, input_ids, attention_mask, image_index=None):
    """Shape and dtype checks with messages that say what was expected. ``image_index``: where
    row i of the text reads image ``image_index[i]`` (default: image i)."""
    if not (torch.is_tensor(images) and images.dim() == 4 and images.shape[1] == 3 and images.is_floating_point()):
        raise LadsError(f"images: expected a float tensor (B, 3, H, W), got {_describe(images)}")
    n, _, h, w = images.shape
    if not (torch.is_tensor(pixel_mask) and pixel_mask.dtype == torch.bool and tuple(pixel_mask.shape) == (n, h, w)):
        raise LadsError(f"pixel_mask: expected a bool tensor ({n}, {h}, {w}), True = padding, "
                        f"got {_describe(pixel_mask)}")
    b = n
    if image_index is not None:
        if not (torch.is_tensor(image_index) and image_index.dim() == 1 and image_index.dtype == torch.long):
            raise LadsError(f"image_index: expected a long tensor (B,), got {_describe(image_index)}")
        b = len(image_index)
        if b and not (0 <= int(image_index.min()) and int(image_index.max()) < n):
            raise LadsError(f"image_index: values must index the {n} images (0 to {n - 1})")
    if not (torch.is_tensor(input_ids) and input_ids.dim() == 2 and input_ids.shape[0] == b
            and input_ids.dtype == torch.long):
        raise LadsError(f"input_ids: expected a long tensor ({b}, L), got {_describe(input_ids)}")
    if not (torch.is_tensor(attention_mask) and tuple(attention_mask.shape) == tuple(input_ids.shape)):
        raise LadsError(f"attention_mask: expected a tensor {tuple(input_ids.shape)}, got {_describe(attention_mask)}")


def check_heads(config: ModelConfig):
    """The inference head exists and the token head's box is trained when it is the one used."""
    w = config.loss
    if config.head not in ("cls", "token"):
        raise LadsError(f"model.head must be 'cls' (the paper) or 'token', got {config.head!r}")
    if config.head == "token" and not (w.token > 0 and w.token_box > 0):
        raise LadsError("model.head=token needs model.loss.token > 0 and model.loss.token_box > 0 (its training terms)")
    for name in ("giou", "mi", "token", "token_box", "deep", "flops", "flops_target"):
        if getattr(w, name) < 0:
            raise LadsError(f"model.loss.{name} must be >= 0, got {getattr(w, name)}")


def check_gates(gates: Gates, layout: GateLayout, batch: int):
    expected = {"layer": (batch, layout.num_layer_gates), "filter": (batch, layout.num_filter_gates)}
    for kind, shape in expected.items():
        g = getattr(gates, kind)
        if not torch.is_tensor(g) or tuple(g.shape) != shape:
            raise LadsError(f"gates.{kind}: expected shape {shape}, got {_describe(g)}")
        if not bool(((g == 0) | (g == 1)).all()):
            raise LadsError(f"gates.{kind}: hard gates must be 0 or 1")


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def build_model(config: str | Config | ModelConfig = "tiny", overrides: list[str] | None = None) -> LADS:
    """A LADS model from a preset name, a JSON config file or a config object.

    >>> model = build_model("tiny", ["model.fusion.num_layers=2"])
    """
    if isinstance(config, (str,)) or hasattr(config, "__fspath__"):
        config = load_config(config, overrides)
    elif overrides:
        raise LadsError("overrides apply to a preset name or a config file, not a config object")
    if isinstance(config, Config):
        config = config.model
    return LADS(config)
