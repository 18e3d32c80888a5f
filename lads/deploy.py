"""Deployment: the static subnet of one gate pattern as an ONNX or TorchScript file
(docs/design.md §3a).

The exported graph is the text backbone followed by the extracted :class:`Subnet` of one gate
pattern (batch norm folded into the convolutions). The text backbone is inside because the
fusion module reads ``F_l`` itself, so a deployment needs it whatever the pattern; with it the
file is self-contained: what runs it needs only the tokenizer (the checkpoint's ``text/``) and
the letterbox of ``lads.inference.prepare_inputs``. The gating network is not inside: the graph
*is* one pattern, and it does not check that another expression would choose the same one.

Inputs: ``images`` float32 (B, 3, S, S), ``pixel_mask`` bool (B, S, S), True = padding,
``input_ids`` int64 (B, L), ``attention_mask`` int64 (B, L); B and L are dynamic, S is the
model's ``image_size``. Outputs (:attr:`ExportedSubnet.output_names`): ``boxes`` (B, 4),
normalised (cx, cy, w, h) of the padded square from the model's inference head (what
``lads predict`` reads), and, where the model has a token head, ``token_scores`` (B, h·w) and
``token_boxes`` (B, h·w, 4).

A gate pattern file is JSON: ``{"expression": "…" (optional, a note), "layer": {candidate: 0|1},
"filter": {bottleneck: "0110…"}}``, with every candidate that has a layer gate ("layer1.1", …,
"fusion.0.attn", …) and, per bottleneck, one character per conv2 filter in channel order.
:func:`export_subnet` writes one beside each export.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from lads.errors import LadsError
from lads.models.gating import GateLayout, Gates
from lads.models.subnet import extract_subnet
from lads.models.text import _quiet_transformers

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
INPUTS = ("images", "pixel_mask", "input_ids", "attention_mask")
TOLERANCE = 1e-4  # max |Δ| of normalised box coordinates between the export and PyTorch
SAMPLE_TEXT = "the object"  # the text of the example inputs when no expression is given
LONGER_TEXT = "the second object from the left of the picture"  # the check's second row
PIP = "pip install 'lads[export]' (or: pip install onnx onnxruntime)"


class ExportedSubnet(nn.Module):
    """Text backbone + the subnet of ``gates``: ``(images, pixel_mask, input_ids,
    attention_mask)`` -> a tuple in the order of ``output_names``. Eval mode, no gradients."""

    def __init__(self, model, gates: Gates):
        super().__init__()
        self.gates = gates
        self.bert = model.text_backbone.bert  # not TextBackbone.forward: its feature cache is Python
        self.subnet = extract_subnet(model, gates, fold_bn=True)
        token_head = model.token_head
        self.output_names = ["boxes", *(["token_scores"] if token_head is not None else []),
                             *(["token_boxes"] if token_head is not None and token_head.box is not None else [])]
        self.eval()

    def forward(self, images, pixel_mask, input_ids, attention_mask):
        text = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = self.subnet(images, pixel_mask, text, attention_mask.bool())
        return tuple(out[name] for name in self.output_names)


# ----------------------------------------------------------------------------- gate patterns


def expression_gates(model, expression: str) -> Gates:
    """The hard gates (1, ·) the gating network chooses for ``expression`` (all open for a
    dense model)."""
    from lads.inference import tokenize

    layout = model.layout
    if model.gating is None:
        return Gates(torch.ones(1, layout.num_layer_gates), torch.ones(1, layout.num_filter_gates))
    tokens = tokenize(model.tokenizer, [expression], model.config.text.max_tokens)
    with torch.no_grad():
        return model.gates(*model.encode_text(tokens["input_ids"], tokens["attention_mask"]))[0]


def write_gate_pattern(path, layout: GateLayout, gates: Gates, expression: str | None = None) -> Path:
    """One pattern (row 0 of ``gates``) as a gate pattern file (the module's docstring)."""
    layer = {layout.names[i]: int(gates.layer[0, j]) for j, i in enumerate(layout.layer_owner)}
    filt = {layout.names[i]: "".join(str(int(g)) for g in gates.filter[0, s].tolist())
            for i, s in enumerate(layout.filter_slices)}
    pattern = {**({"expression": expression} if expression else {}), "layer": layer, "filter": filt}
    path = Path(path)
    path.write_text(json.dumps(pattern, indent=2) + "\n")
    return path


def read_gate_pattern(path, layout: GateLayout) -> tuple[Gates, str | None]:
    """(hard gates (1, ·), the expression noted in the file or None) from a gate pattern file;
    a ``LadsError`` naming the file and the key for anything that does not fit ``layout``."""
    path = Path(path)
    try:
        pattern = json.loads(path.read_text())
    except OSError as e:
        raise LadsError(f"{path}: cannot read the gate pattern ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LadsError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(pattern, dict) or set(pattern) - {"expression", "layer", "filter"} or \
            not {"layer", "filter"} <= set(pattern) or not isinstance(pattern.get("expression", ""), str):
        raise LadsError(f'{path}: expected an object with keys "layer", "filter" and optionally '
                        '"expression" (a string)')
    layer_names = [layout.names[i] for i in layout.layer_owner]
    filter_names = layout.names[: layout.num_visual]
    layer = _named(path, "layer", pattern["layer"], layer_names)
    filt = _named(path, "filter", pattern["filter"], filter_names)
    for name, g in layer.items():
        if type(g) is not int or g not in (0, 1):
            raise LadsError(f'{path}: "layer.{name}" must be 0 or 1, got {g!r}')
    for name, s in zip(filter_names, layout.filter_slices):
        g, width = filt[name], s.stop - s.start
        if not isinstance(g, str) or len(g) != width or set(g) - {"0", "1"}:
            raise LadsError(f'{path}: "filter.{name}" must be a string of {width} characters 0 or 1, got {g!r}')
    return Gates(torch.tensor([[float(layer[n]) for n in layer_names]]),
                 torch.tensor([[float(c) for n in filter_names for c in filt[n]]])), pattern.get("expression")


def _named(path: Path, key: str, value, names: list[str]) -> dict:
    """``value``, a JSON object with exactly the keys ``names``."""
    if not isinstance(value, dict):
        raise LadsError(f'{path}: "{key}" must be an object keyed by {", ".join(names)}; got {type(value).__name__}')
    missing, unknown = [n for n in names if n not in value], sorted(set(value) - set(names))
    if missing or unknown:
        raise LadsError(f'{path}: "{key}" must have exactly the keys {", ".join(names)}; '
                        f'missing: {", ".join(missing) or "none"}, unknown: {", ".join(unknown) or "none"}')
    return value


# ----------------------------------------------------------------------------- export


def sample_inputs(model, expressions: list[str], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs in the exported graph's order for ``expressions``: random images of the model's
    size, the last letterboxed on its right quarter."""
    from lads.inference import tokenize

    size, n = model.config.image_size, len(expressions)
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    pixel_mask = torch.zeros(n, size, size, dtype=torch.bool)
    pixel_mask[-1, :, size * 3 // 4:] = True
    images = images.masked_fill(pixel_mask[:, None], 0)
    tokens = tokenize(model.tokenizer, expressions, model.config.text.max_tokens)
    return images, pixel_mask, tokens["input_ids"], tokens["attention_mask"]


def export_subnet(model, path, *, expression: str | None = None, gates: Gates | None = None,
                  format: str = "onnx") -> ExportedSubnet:
    """Write the subnet of ``gates`` ((1, ·) hard gates) or, without them, of the gates
    ``expression`` chooses, to ``path`` as ``format`` ("onnx" or "torchscript"), and its gate
    pattern file beside it (``NAME.gates.json``, with ``expression`` as its note). Returns the
    PyTorch module that was exported. ``model`` on the CPU."""
    if format not in FORMATS:
        raise LadsError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if expression is None and gates is None:
        raise LadsError("export_subnet: give an expression or a gate pattern (gates)")
    if model.training or next(model.parameters()).device.type != "cpu":
        raise LadsError("export_subnet: the model must be in eval mode on the CPU (model.eval().cpu())")
    if gates is None:
        gates = expression_gates(model, expression)
    module = ExportedSubnet(model, gates)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = sample_inputs(model, [expression or SAMPLE_TEXT])
    with torch.no_grad(), warnings.catch_warnings(), _quiet_transformers():
        # silenced: the tracer's notes on Python values (constants here: one pattern, one image
        # size), the legacy exporter's deprecation notice, transformers' notes on its attributes;
        # check_export runs the file instead
        warnings.simplefilter("ignore")
        if format == "onnx":
            _export_onnx(module, example, path)
        else:
            torch.jit.save(torch.jit.trace(module, example), str(path))
    write_gate_pattern(pattern_path(path), model.layout, gates, expression)
    return module


def pattern_path(path) -> Path:
    """Where :func:`export_subnet` writes the gate pattern of ``path``: ``NAME.gates.json``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.gates.json")


def _export_onnx(module: ExportedSubnet, example, path: Path):
    """The TorchScript-based exporter (``dynamo=False``): no ``onnxscript`` needed, and the
    batch and text length stay dynamic (docs/design.md §3a)."""
    if importlib.util.find_spec("onnx") is None:  # torch.onnx serialises with it
        raise LadsError(f"ONNX export needs the onnx package: {PIP}")
    batch, text = {0: "batch"}, {0: "batch", 1: "text_length"}
    axes = {"images": batch, "pixel_mask": batch, "input_ids": text, "attention_mask": text,
            **{name: batch for name in module.output_names}}
    torch.onnx.export(module, example, str(path), input_names=list(INPUTS), output_names=module.output_names,
                      dynamic_axes=axes, opset_version=17, dynamo=False)


def run_exported(path, format: str, inputs) -> list[torch.Tensor]:
    """The outputs of an exported file on ``inputs`` (the graph's order): onnxruntime on the
    CPU for ONNX, ``torch.jit.load`` for TorchScript."""
    if format == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's, docs/design.md §3a
            return list(torch.jit.load(str(path))(*inputs))
    try:
        import onnxruntime
    except ImportError:
        raise LadsError(f"running an ONNX file needs onnxruntime: {PIP}") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {name: t.numpy() for name, t in zip(INPUTS, inputs)})
    return [torch.from_numpy(o) for o in outputs]


def check_export(model, module: ExportedSubnet, path, format: str, expression: str | None = None) -> float:
    """Max |Δ| between the exported file's ``boxes`` and PyTorch's (``module``) on the same
    inputs: ``expression`` and a longer one, so that the batch and the padding differ from the
    example the export was traced with."""
    inputs = sample_inputs(model, [expression or SAMPLE_TEXT, LONGER_TEXT], seed=1)
    exported = run_exported(path, format, inputs)[0]
    with torch.no_grad():
        expected = module(*inputs)[0]
    if exported.shape != expected.shape:
        raise LadsError(f"{path}: boxes of shape {tuple(exported.shape)}, expected {tuple(expected.shape)}")
    return float((exported - expected).abs().max())
