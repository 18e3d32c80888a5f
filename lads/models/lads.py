"""The LADS supernet: visual and text backbones, gating network, modality interaction, head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lads.config import Config, ModelConfig, load_config
from lads.errors import LadsError
from lads.models.backbone import VisualBackbone, downsample_mask, load_visual_weights
from lads.models.checks import check_gates, check_heads, check_inputs
from lads.models.fusion import ModalityInteraction
from lads.models.gating import GateLayout, Gates, GatingNetwork, binary_gates, straight_through
from lads.models.heads import BoxHead, TokenHead, read_boxes
from lads.models.losses import expected_flops, lads_loss
from lads.models.text import TextBackbone
from lads.util.flops import gate_costs


class LADS(nn.Module):
    """Language Adaptive Dynamic Subnets. ``config.dense`` forces every gate open.

    Args:
        config: the model's ``ModelConfig`` (``Config.model``; :func:`build_model` makes one from
            a preset or a JSON file): ``image_size``, the visual and text backbones, the fusion
            module, the gating network, the heads and the loss weights.

    Raises:
        LadsError: for a config that does not hold together (an unknown ``gating.granularity``
            or ``head``, a LayerDrop probability outside [0, 1) or set on a LADS model, a
            negative loss weight), or a text model that cannot be had offline.
    """

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
        p = config.layer_drop_fusion
        if not 0 <= p < 1:
            raise LadsError(f"model.layer_drop_fusion must be a probability from 0 to below 1, got {p!r}")
        if p and not config.dense:
            raise LadsError("model.layer_drop_fusion is for the dense network (model.dense=true); a LADS "
                            "model's own gates skip its layers")
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

        Args:
            images: float tensor (B, 3, H, W), normalised with ImageNet's mean and standard
                deviation: the image letterboxed to the ``config.image_size`` square, as
                :meth:`prepare` makes them.
            pixel_mask: bool tensor (B, H, W), True = padding.
            input_ids: long tensor (B, L) of token ids, ``[CLS]`` first; row i is grounded on
                image i.
            attention_mask: tensor (B, L), 1 for a token, 0 for padding.
            gates: hard ``Gates`` (0/1, ``layer`` (B, num_layer_gates), ``filter`` (B,
                num_filter_gates)) to use instead of the gating network's (default None).
            n_s: Eq. 5's draw in training (default None: one drawn for this batch).

        Returns:
            A dict: ``boxes`` (B, 4) of the inference head, normalised (cx, cy, w, h) of the
            padded square; ``heads``, ``token_scores``, ``token_boxes``, ``grid`` and
            ``deep_boxes`` as :meth:`ground`'s; ``gates``, the hard gates used (None: every gate
            open); ``soft``, ``relevance`` and ``alpha`` of the gating network (None where it
            did not run); in training, ``flops`` (for ``loss.flops``).

        Raises:
            LadsError: for inputs or gates of the wrong shape or dtype, or gates not 0/1.
        """
        check_inputs(images, pixel_mask, input_ids, attention_mask)
        text, text_mask = self.encode_text(input_ids, attention_mask)
        out = {"gates": gates, "soft": None, "relevance": None, "alpha": None}
        if gates is None and self.gating is not None:
            out["gates"], out["soft"], out["relevance"], out["alpha"] = self.gates(text, text_mask, n_s)
            if self.training:  # the FLOPs of the evaluation's gates 1[r ≥ 0], for loss.flops
                hard = out["relevance"].gates(straight_through)
                out["flops"] = expected_flops(hard, self.layout, self.gate_costs())
        elif gates is not None:
            check_gates(gates, self.layout, images.shape[0])
        elif self.training and self.config.layer_drop_fusion:
            out["gates"] = self.layer_drop(images.shape[0], images.device)
        out.update(self.ground(images, pixel_mask, text, text_mask, out["gates"]))
        return out

    def layer_drop(self, batch: int, device) -> Gates:
        """LayerDrop (Fan et al., ICLR 2020) for the dense network in training: each fusion
        sublayer is skipped with probability ``model.layer_drop_fusion``, independently per
        expression; every bottleneck and filter runs. A network trained so still works with fusion
        sublayers removed, which is what the gates of a LADS model started from it will do
        (docs/design.md §5a)."""
        p = torch.tensor([0.0 if owner < self.layout.num_visual else self.config.layer_drop_fusion
                          for owner in self.layout.layer_owner], device=device)
        keep = torch.rand(batch, self.layout.num_layer_gates, device=device) >= p
        return Gates(keep.float(), torch.ones(batch, self.layout.num_filter_gates, device=device))

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

        Args:
            gates: one expression's hard ``Gates`` (0/1): ``layer`` (num_layer_gates,) or (1,
                num_layer_gates), ``filter`` (num_filter_gates,) or (1, num_filter_gates); e.g.
                row j of ``model(...)["gates"]``.
            fold_bn: fold batch norm into the convolutions before it (default False).

        Returns:
            A ``lads.models.subnet.Subnet`` on the model's device, sharing every tensor it does
            not prune with the model: ``subnet(images, pixel_mask, text, text_mask)`` (``text``,
            ``text_mask``: :meth:`encode_text`'s) gives the ``boxes``, ``heads``,
            ``token_scores`` and ``token_boxes`` of :meth:`ground` with these gates.

        Raises:
            LadsError: in training mode, or for gates that are not a ``Gates`` of one
                expression's 0/1 gates for this model.
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
        from lads.models.pretrained import load_model
        from lads.util.hub import resolve_pretrained

        return load_model(resolve_pretrained(name_or_path, revision, cache_dir), device)[0]

    def save_pretrained(self, folder) -> Path:
        """Write this model as a checkpoint folder to share (weights, config, meta, tokenizer,
        model card; no optimizer state); :meth:`from_pretrained` reads it."""
        from lads.models.pretrained import save_pretrained

        return save_pretrained(self, folder)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload :meth:`save_pretrained`'s folder to the Hugging Face Hub as ``repo_id``."""
        from lads.models.pretrained import push_to_hub

        return push_to_hub(self, repo_id, private, token)

    def predict(self, image, expressions, mode: str = "subnet", dtype: str = "fp32") -> list[dict]:
        """Boxes in original image pixels for one image and one or more expressions; ``dtype``
        fp32, or bf16/fp16 autocast.

        Puts the model in eval mode; it keeps a ``SubnetRunner``, hence a cache of extracted
        subnets, between calls.

        Args:
            image: a path or a PIL image (EXIF orientation honoured).
            expressions: one expression or a list of them, each grounded on ``image``.
            mode: "subnet" (extracted subnets, the default), "masked" (the supernet with the
                gates multiplied in) or "dense" (every gate open).
            dtype: "fp32" (default), "bf16" or "fp16" (autocast).

        Returns:
            One dict per expression, in order: ``expression``; ``box``, [x1, y1, x2, y2] in the
            original image's pixels; the subnet's ``visual_layers``, ``fusion_sublayers``,
            ``filters`` and ``summary`` (a line); ``flops``, its FLOPs as a fraction of the dense
            network's; ``cache_hit`` (whether the subnet came from the cache; None outside
            ``subnet`` mode).

        Raises:
            LadsError: for an unknown ``mode`` or ``dtype``, no expression or an empty one, an
                image that cannot be read.
        """
        from lads.inference import predict
        from lads.util.amp import DTYPES

        if dtype not in DTYPES:
            raise LadsError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return predict(self, image, expressions, mode, tokenizer=self.tokenizer, amp=DTYPES[dtype])

    def predict_many(self, queries, batch_size: int = 64, num_workers: int | None = None, mode: str = "subnet",
                     dtype: str = "fp32"):
        """Answers for many images, each with its expressions, in input order: an iterator of
        dicts (``lads.batch.predict_many``; ``queries``: ``(image, expressions)`` pairs, dicts
        ``{"image", "expressions"}``, or ``lads.batch``'s JSON-lines and folder readers).

        Args:
            queries: ``(image, expressions)`` pairs or ``{"image": …, "expressions": [...]}``
                dicts (an image: a path or a PIL image), a list or any iterable of them, or
                ``lads.batch.JsonlQueries`` / ``FolderQueries``.
            batch_size: expressions grounded together, across images (default 64).
            num_workers: image-reading processes (default None: the cores that torch's
                threads leave free on the CPU, else ``lads.util.dist.loader_workers``).
            mode: "subnet" (default), "masked" or "dense", as :meth:`predict`'s.
            dtype: "fp32" (default), "bf16" or "fp16" (autocast).

        Returns:
            An iterator of dicts, one per expression: ``line`` (the query's place, from 0),
            ``index`` (the expression's place in it), ``image`` (its path, None for a PIL
            image) and :meth:`predict`'s fields (``box`` in original image pixels); one dict
            ``{"line", "image", "error"}`` for a query that cannot be used.

        Raises:
            LadsError: for an unknown ``dtype`` or ``mode``, or ``batch_size`` below 1 (when
                iterated, for the latter two).
        """
        from lads.batch import predict_many
        from lads.util.amp import DTYPES

        if dtype not in DTYPES:
            raise LadsError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return predict_many(self, queries, batch_size, num_workers, mode, DTYPES[dtype])

    def prepare(self, image, expressions) -> dict:
        """``images``, ``pixel_mask``, ``input_ids``, ``attention_mask`` for one image (a path or
        a PIL image) and its expressions, on the model's device: ``model(**model.prepare(…))``.

        Args:
            image: a path or a PIL image (EXIF orientation honoured).
            expressions: one expression or a list of them; longer than
                ``config.text.max_tokens`` tokens: truncated, with a warning.

        Returns:
            A dict of :meth:`forward`'s inputs, row i for expression i: ``images`` (B, 3, S, S)
            (S: ``config.image_size``; the image letterboxed and normalised), ``pixel_mask``
            (B, S, S), ``input_ids`` and ``attention_mask`` (B, L).

        Raises:
            LadsError: for no expression or an empty one, or an image that cannot be read.
        """
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


def build_model(config: str | Config | ModelConfig = "tiny", overrides: list[str] | None = None) -> LADS:
    """A LADS model from a preset name, a JSON config file or a config object.

    >>> model = build_model("tiny", ["model.fusion.num_layers=2"])

    Args:
        config: a preset name ("tiny", "lads-r50", "refcoco", …; ``lads/configs/``), the path of
            a JSON config file, a ``Config`` (its ``model`` is used) or a ``ModelConfig``
            (default "tiny").
        overrides: ``key=value`` strings applied on top of a preset or file, e.g.
            "model.text.pretrained=false" (default None: none).

    Returns:
        A new :class:`LADS` in training mode on the CPU, with the starting weights the config
        names (``model.visual.pretrained``, ``model.text.pretrained``), else random ones.

    Raises:
        LadsError: for an unknown preset or file, a bad override, overrides given with a config
            object, or a config :class:`LADS` refuses.
    """
    if isinstance(config, (str,)) or hasattr(config, "__fspath__"):
        config = load_config(config, overrides)
    elif overrides:
        raise LadsError("overrides apply to a preset name or a config file, not a config object")
    if isinstance(config, Config):
        config = config.model
    return LADS(config)
