"""Inference for a batch of expressions with real subnets (docs/design.md §3).

:class:`SubnetRunner` runs the text backbone and the gating network first (hard gates, eval),
then grounds every expression in one of three modes:

- ``dense``: the supernet with every gate open (the TransVG-style static network);
- ``masked``: the supernet with the gates multiplied in (what training computes);
- ``subnet``: extracted subnets; expressions with identical gate patterns share one subnet and
  one forward, recently extracted subnets are kept in an LRU cache keyed by the gate bits.
"""

from __future__ import annotations

import textwrap
import time
from collections import OrderedDict

import numpy as np
import torch

from lads.errors import LadsError, warn
from lads.models.checks import check_inputs
from lads.models.gating import Gates
from lads.models.subnet import BackbonePlan, Subnet, extract_subnet, shared_backbones, subnet_tensors, weights_version
from lads.util.amp import amp_dtype, autocast, check_amp

MODES = ("dense", "masked", "subnet")


def tokenize(tokenizer, expressions: list[str], max_tokens: int) -> dict:
    """Token ids with ``[CLS]`` first; an empty expression is an error, a long one is truncated
    (one warning per call, naming how many and the first, abbreviated)."""
    for e in expressions:
        if not isinstance(e, str) or not e.strip():
            raise LadsError(f"expression {e!r} is empty")
    lengths = [len(ids) for ids in tokenizer(expressions, add_special_tokens=True)["input_ids"]]
    long = [(e, n) for e, n in zip(expressions, lengths) if n > max_tokens]
    if long:
        e, n = long[0]
        warn(f"{len(long)} expression(s) longer than model.text.max_tokens = {max_tokens} tokens were "
             f"truncated (first: {textwrap.shorten(e, 60)!r}, {n} tokens)")
    return tokenizer(expressions, max_length=max_tokens, truncation=True, padding=True, return_tensors="pt")


def prepare_inputs(image, expressions: list[str] | str, config, tokenizer) -> tuple[dict, dict]:
    """The model's inputs for one image and its expressions: ``images`` (B, 3, S, S),
    ``pixel_mask``, ``input_ids``, ``attention_mask`` (row i: expression i on the image), and the
    letterbox's ``meta`` for ``box_to_original``. ``image``: a path or a PIL image (EXIF
    orientation honoured); ``config``: the model's ``ModelConfig``."""
    from lads.datasets.images import open_rgb
    from lads.datasets.transforms import eval_transform

    expressions = [expressions] if isinstance(expressions, str) else list(expressions)
    if not expressions:
        raise LadsError("give at least one expression")
    pil = open_rgb(image)
    tokens = tokenize(tokenizer, expressions, config.text.max_tokens)
    tensor, pixel_mask, _, _, meta = eval_transform(pil, None, "", config.image_size)
    n = len(expressions)
    inputs = {"images": tensor[None].expand(n, -1, -1, -1), "pixel_mask": pixel_mask[None].expand(n, -1, -1),
              "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    return inputs, meta


def predict(model, image, expressions: list[str] | str, mode: str = "subnet", tokenizer=None,
            amp: str = "none") -> list[dict]:
    """Boxes ``[x1, y1, x2, y2]`` in original image pixels, one dict per expression, with the
    subnet that found it (``describe``); ``amp`` as ``SubnetRunner``'s. The model keeps a
    runner, hence a cache of subnets, between calls (one per ``amp``)."""
    return ground_image(model, model_runner(model, amp), image, expressions, mode, tokenizer)[1]


def model_runner(model, amp: str = "none") -> "SubnetRunner":
    """The ``SubnetRunner`` the model keeps for ``predict`` and ``predict_many`` (made again for
    another ``amp``), with the model in eval mode."""
    if model.training:
        model.eval()
    if getattr(model, "_runner", None) is None or model._runner.amp != amp:
        model._runner = SubnetRunner(model, amp=amp)
    return model._runner


def ground_image(model, runner, image, expressions: list[str] | str, mode: str = "subnet", tokenizer=None):
    """One image and its expressions through ``runner`` (the model's ``SubnetRunner``), the
    image through the visual backbone once per gate pattern: the runner's result and
    ``describe``'s dicts."""
    expressions = [expressions] if isinstance(expressions, str) else list(expressions)
    inputs, meta = prepare_inputs(image, expressions, model.config, tokenizer or model.tokenizer)
    device = next(model.parameters()).device
    result = runner(inputs["images"][:1].to(device), inputs["pixel_mask"][:1].to(device),
                    inputs["input_ids"].to(device), inputs["attention_mask"].to(device), mode=mode,
                    image_index=torch.zeros(len(expressions), dtype=torch.long, device=device))
    return result, describe(model, result, [meta] * len(expressions), expressions, inputs["attention_mask"])


def describe(model, result: dict, metas: list[dict], expressions: list[str], attention_mask) -> list[dict]:
    """One dict per expression of a runner's ``result``: the box in original image pixels (by
    the letterbox ``metas[j]`` of its image), the subnet's size (``GateLayout.summary``), its
    FLOPs as a fraction of the dense network's at the expression's length, and whether the
    subnet came from the cache."""
    from lads.datasets.transforms import box_to_original

    cached = {row: hit for rows, hit in zip(result["groups"], result["cached"]) for row in rows}
    gates, boxes, sizes = result["gates"], result["boxes"].float().cpu(), {}
    out = []
    for j, expression in enumerate(expressions):
        length = int(attention_mask[j].sum())
        key = (gate_key(gates, j), length)  # one pattern and length, one size
        if key not in sizes:
            sizes[key] = {**model.layout.summary(gates, j), "flops": round(model.subnet_flops(gates, j, length), 4)}
        out.append({"expression": expression, "box": [round(float(v), 2) for v in box_to_original(boxes[j], metas[j])],
                    **sizes[key], "cache_hit": cached.get(j)})
    return out


def gate_key(gates: Gates, row: int) -> bytes:
    """The cache key of one expression's hard gates: its packed layer and filter bits."""
    bits = torch.cat((gates.layer[row], gates.filter[row])).bool().cpu().numpy()
    return np.packbits(bits).tobytes()


def group_by_pattern(gates: Gates) -> dict[bytes, list[int]]:
    """Rows with identical gate patterns, in order of first appearance."""
    groups: dict[bytes, list[int]] = {}
    for row in range(len(gates)):
        groups.setdefault(gate_key(gates, row), []).append(row)
    return groups


class SubnetRunner:
    """Ground a batch of expressions with dense, masked or extracted networks.

    ``SubnetRunner(model, cache_mb=None, fold_bn=True, channels_last=True, amp="none")``;
    ``model`` must be in eval mode; batch norm is folded into the subnets' convolutions unless
    ``fold_bn=False`` (each convolution folded once, shared by every subnet), and folded or
    sliced weights are NHWC unless ``channels_last=False`` (faster convolutions on CPUs and
    GPUs: benchmarks/README.md). Subnets share every tensor they do not prune with the
    supernet. ``amp`` (``none``, ``bf16``, ``fp16``) runs everything under that autocast, with
    the folded weights stored in its dtype; boxes and gates stay float32 (``lads.util.amp``).

    The cache keeps recent subnets (least recently used evicted) while the bytes of the tensors
    their extraction made stay within ``cache_mb`` (default ``model.config.subnet_cache_mb``;
    0: none kept). It is emptied, and the folded weights made again, when the supernet's
    weights change (an optimizer step, ``load_state_dict``, moving the model): a stale subnet is
    never served.

    ``runner(images, pixel_mask, input_ids, attention_mask, mode="subnet", image_index=None)``
    grounds a batch (:meth:`__call__`).

    Args:
        model: the :class:`~lads.models.lads.LADS` supernet (dense or LADS), in eval mode when
            called; the runner keeps a reference, not a copy.
        cache_mb: MiB of tensors that extraction made (sliced and folded weights) the cache may
            hold (default None: ``model.config.subnet_cache_mb``; 0: no subnet kept).
        fold_bn: fold batch norm into the subnets' convolutions (default True).
        channels_last: store folded or sliced weights, and run the subnets, in NHWC (default
            True).
        amp: "none" (float32, the default), "bf16" or "fp16": the autocast of every call.

    Raises:
        LadsError: for a negative ``cache_mb`` or an unknown ``amp``.
    """

    def __init__(self, model, cache_mb: float | None = None, fold_bn: bool = True, channels_last: bool = True,
                 amp: str = "none"):
        cache_mb = model.config.subnet_cache_mb if cache_mb is None else cache_mb
        if cache_mb < 0:
            raise LadsError(f"cache_mb must be >= 0, got {cache_mb}")
        check_amp(amp, "amp")
        self.model, self.amp = model, amp
        self.cache_bytes = int(cache_mb * 2**20)
        self.fold_bn = fold_bn
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.cache: OrderedDict[bytes, Subnet] = OrderedDict()
        self._cached_bytes = 0  # kept as subnets come and go: a miss does not sum the whole cache
        self._plan, self._version = None, None
        self._tensors = subnet_tensors(model)

    @property
    def cached_bytes(self) -> int:
        """Bytes of the tensors the cached subnets made (the rest is the supernet's)."""
        return self._cached_bytes

    def clear(self):
        self.cache.clear()
        self._cached_bytes = 0
        self._plan = None

    def plan(self) -> BackbonePlan:
        """The backbone plan of the current weights; the cache is emptied when they changed."""
        version = weights_version(self._tensors)
        if self._plan is None or version != self._version:
            self.clear()
            self._plan = BackbonePlan(self.model.visual_backbone, self.fold_bn, self.memory_format,
                                      amp_dtype(self.amp))
            self._version = version
        return self._plan

    def subnet(self, key: bytes, gates: Gates, plan: BackbonePlan) -> tuple[Subnet, bool]:
        """The cached subnet for ``key``, or a freshly extracted one; and whether it was cached."""
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key], True
        subnet = extract_subnet(self.model, gates, plan=plan)
        if subnet.new_bytes <= self.cache_bytes:
            self.cache[key] = subnet
            self._cached_bytes += subnet.new_bytes
            while self._cached_bytes > self.cache_bytes:
                self._cached_bytes -= self.cache.popitem(last=False)[1].new_bytes
        return subnet, False

    @torch.inference_mode()
    def __call__(self, images, pixel_mask, input_ids, attention_mask, mode: str = "subnet",
                 image_index=None) -> dict:
        """Ground row i of the text on image ``image_index[i]``, under ``torch.inference_mode``
        and the runner's autocast. In ``subnet`` mode each image runs each bottleneck once per
        sequence of bottlenecks before it (``shared_backbones``).

        Args:
            images: float tensor (N, 3, H, W), letterboxed and normalised as
                ``prepare_inputs`` makes them, on the model's device.
            pixel_mask: bool tensor (N, H, W), True = padding.
            input_ids: long tensor (B, L), ``[CLS]`` first (``tokenize``).
            attention_mask: tensor (B, L), 1 for a token, 0 for padding.
            mode: "subnet" (extracted subnets, the default), "masked" (the supernet with the
                gates multiplied in) or "dense" (every gate open).
            image_index: long tensor (B,), the image of each row (default None: image i, N = B).

        Returns:
            A dict:

            - ``boxes``: (B, 4) normalised (cx, cy, w, h) of the padded square, in input
              order, of the model's inference head (``model.head``); ``heads``: the boxes of
              each head the model has;
            - ``gates``: the hard ``Gates`` applied (all ones in ``dense`` mode or for a dense
              model);
            - ``times``: seconds, ``text`` (text backbone + gating), ``extract`` (subnet
              extraction, 0 on cache hits), ``forward`` (visual backbone + fusion + head),
              ``total``;
            - ``groups``: lists of row indices run together (one forward each), and ``cached``:
              for each group, whether its subnet came from the cache (None outside ``subnet``
              mode);
            - ``cache``: ``{"hits": n, "misses": n}`` for this call.

        Raises:
            LadsError: for an unknown ``mode``, a model in training mode, or inputs of the
                wrong shape or dtype.
        """
        with autocast(images.device, self.amp):
            return self._run(images, pixel_mask, input_ids, attention_mask, mode, image_index)

    def _run(self, images, pixel_mask, input_ids, attention_mask, mode: str, image_index) -> dict:
        model = self.model
        if mode not in MODES:
            raise LadsError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if model.training:
            raise LadsError("SubnetRunner: the model is in training mode; call model.eval() first")
        check_inputs(images, pixel_mask, input_ids, attention_mask, image_index)
        if image_index is not None and mode != "subnet":  # the supernet reads one image per row
            images, pixel_mask, image_index = images[image_index], pixel_mask[image_index], None
        clock = _Clock(images.device)
        batch = len(input_ids)

        text, text_mask = model.encode_text(input_ids, attention_mask)
        if model.gating is None or mode == "dense":
            gates = Gates(
                images.new_ones(batch, model.layout.num_layer_gates),
                images.new_ones(batch, model.layout.num_filter_gates),
            )
        else:
            gates = model.gates(text, text_mask)[0]
        times = {"text": clock.lap(), "extract": 0.0, "forward": 0.0}

        hits = misses = 0
        cached = []
        if mode == "subnet":
            groups = list(group_by_pattern(gates).items())
            plan = self.plan()
            subnets = []
            for key, rows in groups:
                subnet, hit = self.subnet(key, gates.map(lambda g: g[rows[:1]]), plan)
                hits, misses = hits + hit, misses + (not hit)
                subnets.append(subnet)
                cached.append(hit)
            times["extract"] = clock.lap()
            rows = [torch.tensor(r, device=images.device) for _, r in groups]
            image_index = torch.arange(batch, device=images.device) if image_index is None else image_index
            used, inverse = zip(*(image_index[r].unique(return_inverse=True) for r in rows))
            images = images.contiguous(memory_format=self.memory_format)
            heads = {}
            for subnet, idx, u, inv, x in zip(subnets, rows, used, inverse,
                                              shared_backbones(subnets, images, list(used))):
                out = subnet.fuse(x, pixel_mask[u], text[idx], text_mask[idx], inv)
                for name, boxes in out["heads"].items():
                    heads.setdefault(name, images.new_empty(batch, 4))[idx] = boxes.to(images.dtype)
            times["forward"] = clock.lap()
            groups = [r for _, r in groups]
        else:
            heads = model.ground(images, pixel_mask, text, text_mask, None if mode == "dense" else gates)["heads"]
            times["forward"] = clock.lap()
            groups, cached = [list(range(batch))], [None]
        times["total"] = sum(times.values())
        return {"boxes": heads[model.config.head], "heads": heads, "gates": gates, "times": times,
                "groups": groups, "cached": cached, "cache": {"hits": hits, "misses": misses}}


class _Clock:
    """Seconds between calls, with the device synchronised (GPU kernels run asynchronously)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.last = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed
