"""Configuration as data: presets in ``lads/configs/*.json``, overridable with ``key=value``.

A config is a tree of dataclasses. Files and overrides are plain dicts that are checked
against that tree: an unknown key names the known ones, a value of the wrong type names the
field and the type it expected.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lads.errors import LadsError

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(LadsError):
    """A config file, preset name or override that cannot be used."""


@dataclass
class VisualConfig:
    """ResNet-50 topology (docs/design.md §2); ``width`` is the stem width (64 = ResNet-50)."""

    width: int = 64
    norm: str = "frozen"  # "frozen" (DETR, for pretrained weights) or "batch" (from scratch)
    dilation: bool = False  # layer4 dilated instead of strided: C5 at stride 16 (DETR's DC5)
    frozen_stages: int = 1  # 0: nothing frozen, 1: stem + layer1 (DETR), ... 4: everything
    pretrained: Optional[str] = None  # torchvision-layout or DETR checkpoint, path or URL
    allow_eval_overlap: bool = False  # start from weights that saw the evaluation images (design §4a): on purpose only


@dataclass
class TextConfig:
    """A Hugging Face BERT, truncated at load time to its first ``num_layers`` layers."""

    name: str = "bert-base-uncased"  # hub name, local directory, or "minilm-l6" (offline)
    num_layers: int = 6
    max_tokens: int = 40
    pretrained: bool = True  # False: the same architecture, randomly initialised
    frozen: bool = False  # no gradient, no dropout; F_l of each expression computed once and cached


@dataclass
class FusionConfig:
    """Modality interaction module: M pre-norm encoder layers with gated residuals (Eq. 6)."""

    d_model: int = 256
    num_layers: int = 6
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1


@dataclass
class GatingConfig:
    """Gating network (Eqs. 1-3) and binary gates (Eqs. 4-5)."""

    hidden: int = 24  # d_h; 24 gives ~0.6 M parameters at paper scale, the paper's figure
    bias_init: float = 3.0  # gates start mostly open (sigmoid(3) = 0.95)
    granularity: str = "batch"  # soft/hard choice of Eq. 5: once per "batch" or per "element"
    static: bool = False  # the static control: a learned constant in place of F_l, one mask for all (§5c)


@dataclass
class LossConfig:
    """Weights of Eq. 9, then training-only terms beyond the paper (docs/design.md §5a); at 0
    the loss and its gradients are exactly Eq. 9's."""

    giou: float = 1.0
    mi: float = 0.1
    token: float = 0.0  # cross-entropy of a score per fused visual token: the target's centre cell
    token_box: float = 0.0  # L1 + GIoU of the token head's box at the target's centre cell
    deep: float = 0.0  # deep supervision: the box head on every earlier fusion layer's [CLS]
    flops: float = 0.0  # budget: penalty on the subnets' mean FLOPs fraction above flops_target
    flops_target: float = 0.5  # of the dense network's FLOPs, averaged over the expressions of a batch
    flops_floor: float = 0.0  # and below this: models compared under one budget end at its FLOPs (§5c)


@dataclass
class ModelConfig:
    image_size: int = 512
    dense: bool = False  # every gate forced open: the TransVG-style static baseline
    head: str = "cls"  # the box at inference: "cls" (the paper) or "token" (beyond the paper)
    init: Optional[str] = None  # start from a checkpoint's weights (a dense one: the gating network is new)
    layer_drop_fusion: float = 0.0  # dense training only (LayerDrop): skip each fusion sublayer with this probability
    subnet_cache_mb: float = 256.0  # inference: MB of sliced and folded tensors the subnet cache may hold
    visual: VisualConfig = field(default_factory=VisualConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    gating: GatingConfig = field(default_factory=GatingConfig)
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class MixtureSource:
    """One dataset of a pre-training mixture (docs/data.md, "Mixtures")."""

    path: str = ""
    split: str = "train"
    weight: Optional[float] = None  # its share of an epoch; unset for every source: shares as sizes
    image_root: Optional[str] = None
    split_by: Optional[str] = None


@dataclass
class EvalSet:
    """A dataset whose evaluation images (val, test, testA, testB, testC) a mixture leaves out."""

    path: str = ""
    split_by: Optional[str] = None


@dataclass
class DataConfig:
    """Where the expressions are; ``path`` is any dataset ``lads data stats`` reads (REFER,
    TransVG, Flickr30k Entities, Visual Genome, JSONL). With a ``mixture``, training draws from
    its sources instead and ``path`` is the evaluation set."""

    path: str = ""
    image_root: Optional[str] = None  # the images' folder; None: found where the toolkits put them (docs/data.md)
    split_by: Optional[str] = None  # REFER splitBy (unc, google, umd, berkeley)
    train_split: str = "train"
    eval_splits: list[str] = field(default_factory=lambda: ["val"])
    augment: bool = True
    crop: float = 0.5  # probability of the random crop that keeps the box (0: none; see docs/design.md)
    hue: float = 0.0  # probability of a random hue rotation where the expression names no colour (design §5a)
    # loader processes per training process; None: fit to the cores (util.dist.loader_workers)
    num_workers: Optional[int] = None
    strict: bool = False  # bad records are errors rather than skipped and counted
    # training images unreadable mid-epoch that are skipped (named in the log) before the run stops
    max_bad_images: int = 100
    mixture: list[MixtureSource] = field(default_factory=list)  # training sources, sampled by weight
    exclude: Optional[list[EvalSet]] = None  # their eval images leave the mixture; unset: its REFER/TransVG sources
    index_dir: str = "data/index"  # record tables of the mixture's sources, built once, memory-mapped


@dataclass
class TrainConfig:
    """Optimisation (docs/design.md §5): AdamW, warm-up, step decay, clipping, accumulation."""

    epochs: int = 120
    lr_drop_epoch: int = 90  # learning rates × 0.1 from this epoch on
    lr_drop_fraction: Optional[float] = None  # or at this fraction of max_steps (else of max_minutes)
    batch_size: int = 256  # global batch = processes × micro_batch × accumulation
    micro_batch: int = 32  # per process and forward pass
    lr: float = 1e-4
    lr_backbone: float = 1e-5  # visual and text backbones
    lr_visual: Optional[float] = None  # visual backbone, if not lr_backbone (one trained from scratch)
    lr_gating: Optional[float] = None  # gating network, if not lr (docs/design.md §5c)
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    clip_grad: float = 0.1  # max gradient norm; 0 disables
    amp: str = "none"  # "bf16"/"fp16" autocast (CPU or CUDA; fp16 scales the loss), "none", or "auto" (bf16 if native)
    channels_last: bool = True  # the visual backbone in NHWC (faster convolutions, same values)
    seed: int = 0
    max_steps: Optional[int] = None  # stop after this many optimizer steps (if epochs last longer)
    max_minutes: Optional[float] = None  # stop (with a checkpoint) after this wall time
    checkpoint_every: int = 500  # optimizer steps
    log_every: int = 10
    eval_every: float = 0.0  # epochs between val evaluations (Prec@0.5 in the log); 0: none
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default)
    out: str = "runs/lads"


@dataclass
class PretrainConfig:
    """Detection pre-training of the visual backbone (``lads pretrain``), on the boxes of
    ``data.path`` (a REFER folder, or a COCO instances file less the evaluation images of
    ``data.exclude``); it stops after ``steps`` or ``max_minutes``, whichever comes first."""

    steps: int = 2000
    max_minutes: float = 4.0
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 0  # the learning rate rises linearly over these first steps
    weight_decay: float = 1e-4
    hue: float = 0.0  # probability of a random hue rotation of an image (its colour labels then ignored)
    init: Optional[str] = None  # start from these weights (e.g. torchvision's ImageNet ResNet-50), path or URL
    seed: int = 0
    out: str = "runs/pretrain"


@dataclass
class DemoConfig:
    """``lads demo``'s schedule (docs/design.md §5a): synthetic images, then dense training shared
    by the three models, then each model's own training from it (LADS and the static control: the
    gates join); with ``cls_steps``, a dense stage with Eq. 9 alone between the two, from which
    stage 2 starts (the paper's model, docs/design.md §5e). Budgets are steps, scaled once by the
    machine's speed (``fit_to_machine``), so a run's figures do not depend on the machine's load,
    unless a stage reaches its cap in minutes first (the pre-training's: ``pretrain.steps``,
    ``pretrain.max_minutes``)."""

    images: int = 4000  # train/val/test images; held-out ones are added
    fit_to_machine: bool = True  # scale every stage's steps by reference_step_s / this machine's (a probe)
    reference_step_s: float = 0.80  # seconds per tiny training step where the steps below take ~30 minutes
    shared_steps: int = 580  # stage 1: the dense network, once, for the three models
    steps: int = 270  # stage 2: LADS (gates on), the static control and dense, each from stage 1
    shared_minutes: float = 9.5  # caps on the stages' time: a slower machine stops there, with fewer steps
    minutes: float = 5.75
    warmup_epochs: float = 0.1  # stage 2 starts from trained weights: a short warm-up
    lr_drop_fraction: float = 0.5  # stage 2: learning rates × 0.1 after this fraction of it
    layer_drop_fusion: float = 0.3  # stage 1: model.layer_drop_fusion, so that LADS may cut the fusion
    shared_overrides: list[str] = field(default_factory=list)  # stage 1 only, on top of the config
    cls_steps: int = 0  # a dense stage training Eq. 9 alone between stage 1 and stage 2 (tiny-paper); 0: none
    cls_minutes: float = 30.0  # its cap
    models: list[str] = field(default_factory=lambda: ["lads", "static", "dense"])  # stage 2: a subset of these


@dataclass
class ServeConfig:
    """``lads serve``: where it listens and what one request may hold."""

    host: str = "127.0.0.1"  # this machine only; 0.0.0.0 opens it to the network
    port: int = 8000
    max_image_mb: float = 20.0
    max_megapixels: float = 40.0
    max_expressions: int = 16  # per request
    max_expression_chars: int = 500
    dtype: str = "fp32"  # or bf16 / fp16 autocast (boxes and gates stay fp32)
    api_key: Optional[str] = None  # every /v1/* call must carry it; better in the LADS_API_KEY environment variable
    requests_per_minute: int = 120  # per client address, over /v1/* (429 beyond); 0: no limit
    max_concurrent: int = 8  # predict requests running or waiting (503 beyond, not a growing queue)


@dataclass
class Config:
    preset: Optional[str] = None  # the preset or config file this came from (recorded, not read)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


# ----------------------------------------------------------------------------- loading


def known_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_raw(name_or_path: str | Path) -> dict:
    """The dict of a preset name or a JSON file, with its ``base`` chain merged in."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.exists()):
        if str(name_or_path) not in known_presets():
            raise ConfigError(
                f"unknown preset or config file {str(name_or_path)!r}; "
                f"known presets: {', '.join(known_presets())}"
            )
        path = PRESET_DIR / f"{name_or_path}.json"
    data = _read_json(path)
    base = data.pop("base", None)
    return _merge(load_raw(base), data) if base else data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value); the value is JSON when it parses as JSON."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return raw


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


# Keys that configs saved by earlier versions still hold (every checkpoint keeps its whole config),
# with the one value they ever took in a preset: read and dropped at that value, refused at another.
RETIRED = {
    "model.layer_drop_visual": 0.0,  # LayerDrop on the bottlenecks in stage 1: measured, not kept
    "model.filter_drop": 0.0,  # random filters closed in stage 1: measured, not kept (docs/experiments.md)
    "demo.layer_drop_visual": 0.0,
    "demo.filter_drop": 0.0,
}


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``, refusing unknown keys and wrong types; ``RETIRED``
    keys at their one value are dropped."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a section (an object), got {data!r}")
    data = dict(data)
    section = where.removeprefix("config").removeprefix(".")
    for key in [k for k in data if f"{section}.{k}" in RETIRED]:
        retired, value = RETIRED[f"{section}.{key}"], data.pop(key)
        if value != retired:
            raise ConfigError(f"{where}.{key} was removed (measured and not kept: docs/experiments.md); "
                              f"only its value {retired} can still be read, got {value!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(names)}"
        )
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def load_config(name_or_path: str | Path = "tiny", overrides: list[str] | None = None) -> Config:
    """A preset name or JSON file, with ``key=value`` overrides applied on top; ``preset``
    records which (the model card names it)."""
    raw = load_raw(name_or_path)
    raw.setdefault("preset", Path(name_or_path).stem)
    return from_dict(Config, apply_overrides(raw, overrides or []))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> Config:
    return from_dict(Config, data)


# ----------------------------------------------------------------------------- from the command line


def add_config_arguments(parser, out_key: str | None = None, default: str = "tiny", data: bool = True) -> None:
    """``--config`` (default ``default``), ``--set`` and, with ``data``, ``--data`` and, given
    ``out_key``, ``--out``, which sets ``out_key``."""
    parser.add_argument("--config", default=default, help=f"preset name or JSON config file (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. train.epochs=10 (repeatable)")
    if data:
        parser.add_argument("--data", help="shortcut for --set data.path=PATH")
    if out_key:
        parser.add_argument("--out", help=f"shortcut for --set {out_key}=DIR")


def config_overrides(args, out_key: str | None = None) -> list[str]:
    """The ``--set`` values, then ``--data`` and (given ``out_key``) ``--out`` as overrides."""
    return [*args.overrides, *([f"data.path={args.data}"] if getattr(args, "data", None) else []),
            *([f"{out_key}={args.out}"] if out_key and args.out else [])]
