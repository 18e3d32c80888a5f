"""Deployment files (docs/design.md §3a): the subnet of one gate pattern, or a bank of them
with the gating network, as ONNX (or TorchScript for one pattern).

One pattern (:func:`export_subnet`): the text backbone followed by the extracted
:class:`Subnet` of the pattern (batch norm folded into the convolutions). The text backbone is
inside because the fusion module reads ``F_l`` itself; with it the file is self-contained: what
runs it needs only the tokenizer (the checkpoint's ``text/``) and the letterbox of
``lads.util.image``. The gating network is not inside: the graph *is* one pattern, and it does
not check that another expression would choose the same one.

Inputs: ``images`` float32 (B, 3, S, S), ``pixel_mask`` bool (B, S, S), True = padding,
``input_ids`` int64 (B, L), ``attention_mask`` int64 (B, L); B and L are dynamic, S is the
model's ``image_size``. Outputs (:attr:`ExportedSubnet.output_names`): ``boxes`` (B, 4),
normalised (cx, cy, w, h) of the padded square from the model's inference head (what
``lads predict`` reads), and, where the model has a token head, ``token_scores`` (B, h·w) and
``token_boxes`` (B, h·w, 4).

A bank (:func:`export_bank`): the dynamic model as a folder that ``lads.deploy`` runs without
torch. ``gating.onnx`` maps tokens to ``F_l`` and the hard gates; ``subnet-NNN.onnx`` are the
most frequent patterns of a split, as many as cover ``coverage`` of its expressions, and
``dense.onnx`` has every gate open. These take ``F_l`` (``text``, (B, L, D)) instead of tokens,
and ``image_index`` (B,): row i reads image ``image_index[i]``, so an image passes the visual
backbone once. ``bank.json`` indexes them by pattern (:data:`BANK_INDEX`); ``text/`` holds the
tokenizer.

A gate pattern file is JSON: ``{"expression": "…" (optional, a note), "layer": {candidate: 0|1},
"filter": {bottleneck: "0110…"}}``, with every candidate that has a layer gate ("layer1.1", …,
"fusion.0.attn", …) and, per bottleneck, one character per conv2 filter in channel order.
:func:`export_subnet` writes one beside each export.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from lads.deploy import BANK_FORMAT, BANK_INDEX
from lads.errors import LadsError
from lads.models.gating import GateLayout, Gates, binary_gates
from lads.models.subnet import extract_subnet
from lads.models.text import quiet_transformers

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
INPUTS = ("images", "pixel_mask", "input_ids", "attention_mask")
BANK_INPUTS = ("images", "pixel_mask", "text", "attention_mask", "image_index")
TOLERANCE = 1e-4  # max |Δ| of normalised box coordinates between the export and PyTorch
SAMPLE_TEXT = "the object"  # the text of the example inputs when no expression is given
LONGER_TEXT = "the second object from the left of the picture"  # the check's second row
PIP = "pip install 'lads[export]' (or: pip install onnx onnxruntime)"


class ExportedSubnet(nn.Module):
    """Text backbone + the subnet of ``gates``: ``(images, pixel_mask, input_ids,
    attention_mask)`` -> a tuple in the order of ``output_names``; with ``bank=True``, the
    subnet alone: ``(images, pixel_mask, text, attention_mask, image_index)`` (the module's
    docstring). Eval mode, no gradients."""

    def __init__(self, model, gates: Gates, bank: bool = False):
        super().__init__()
        self.gates = gates
        # not TextBackbone.forward: its feature cache is Python
        self.bert = None if bank else model.text_backbone.bert
        self.subnet = extract_subnet(model, gates, fold_bn=True)
        token_head = model.token_head
        self.input_names = list(BANK_INPUTS if bank else INPUTS)
        self.output_names = ["boxes", *(["token_scores"] if token_head is not None else []),
                             *(["token_boxes"] if token_head is not None and token_head.box is not None else [])]
        self.eval()

    def forward(self, images, pixel_mask, text, attention_mask, image_index=None):
        if self.bert is not None:  # ``text`` is the token ids
            text = self.bert(input_ids=text, attention_mask=attention_mask).last_hidden_state
        out = self.subnet(images, pixel_mask, text, attention_mask.bool(), image_index)
        return tuple(out[name] for name in self.output_names)


class ExportedGating(nn.Module):
    """The text backbone and the gating network (Eqs. 1-4, hard gates of eval):
    ``(input_ids, attention_mask)`` -> ``(text, layer_gates, filter_gates)``, the gates 0/1
    float32; every gate open for a dense model."""

    input_names = ["input_ids", "attention_mask"]
    output_names = ["text", "layer_gates", "filter_gates"]

    def __init__(self, model):
        super().__init__()
        self.bert, self.gating, self.layout = model.text_backbone.bert, model.gating, model.layout
        self.eval()

    def forward(self, input_ids, attention_mask):
        text = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.gating is None:
            ones = text.new_ones(text.shape[0], 1)
            return text, ones.expand(-1, self.layout.num_layer_gates), ones.expand(-1, self.layout.num_filter_gates)
        relevance, _ = self.gating(text, attention_mask.bool())
        gates, _ = binary_gates(relevance, training=False)
        return text, gates.layer, gates.filter


# ----------------------------------------------------------------------------- gate patterns


def expression_gates(model, expressions: str | list[str]) -> Gates:
    """The hard gates (n, ·) the gating network chooses for an expression or a list of them
    (all open for a dense model)."""
    from lads.inference import tokenize

    expressions = [expressions] if isinstance(expressions, str) else expressions
    layout, n = model.layout, len(expressions)
    if model.gating is None:
        return Gates(torch.ones(n, layout.num_layer_gates), torch.ones(n, layout.num_filter_gates))
    tokens = tokenize(model.tokenizer, expressions, model.config.text.max_tokens)
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


def sample_inputs(model, expressions: list[str], seed: int = 0, bank: bool = False) -> tuple[torch.Tensor, ...]:
    """Inputs in the exported graph's order for ``expressions``: random images of the model's
    size, the last letterboxed on its right quarter; for a bank subnet, ``F_l`` instead of the
    tokens and the images read in reverse order (``image_index``)."""
    from lads.inference import tokenize

    size, n = model.config.image_size, len(expressions)
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    pixel_mask = torch.zeros(n, size, size, dtype=torch.bool)
    pixel_mask[-1, :, size * 3 // 4:] = True
    images = images.masked_fill(pixel_mask[:, None], 0)
    tokens = tokenize(model.tokenizer, expressions, model.config.text.max_tokens)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    if not bank:
        return images, pixel_mask, ids, mask
    with torch.no_grad():
        text = model.text_backbone.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    return images, pixel_mask, text, mask, torch.arange(n - 1, -1, -1)


def export_subnet(model, path, *, expression: str | None = None, gates: Gates | None = None,
                  format: str = "onnx") -> ExportedSubnet:
    """Write the subnet of ``gates`` ((1, ·) hard gates) or, without them, of the gates
    ``expression`` chooses, to ``path`` as ``format`` ("onnx" or "torchscript"), and its gate
    pattern file beside it (``NAME.gates.json``, with ``expression`` as its note). Returns the
    PyTorch module that was exported. ``model`` on the CPU.

    Args:
        model: a :class:`~lads.models.lads.LADS` in eval mode on the CPU.
        path: the file to write (its folder is made); ``NAME.onnx`` or ``NAME.pt`` by convention.
        expression: the expression whose gates (the gating network's choice) make the subnet
            when ``gates`` is not given; also the gate pattern file's note and the text the
            export is traced with (keyword only; default None).
        gates: a gate pattern to export instead, hard ``Gates`` (0/1) of shape (1, ·), e.g.
            from ``read_gate_pattern`` (keyword only; default None: ``expression``'s).
        format: "onnx" (default; needs the onnx package) or "torchscript".

    Returns:
        The :class:`ExportedSubnet` that was written: ``(images, pixel_mask, input_ids,
        attention_mask)`` -> a tuple in the order of its ``output_names``, ``boxes`` (B, 4)
        normalised (cx, cy, w, h) of the padded square first (the module's docstring).

    Raises:
        LadsError: for an unknown ``format``, neither ``expression`` nor ``gates``, a model in
            training mode or off the CPU, gates of the wrong shape, no onnx package for ONNX.
    """
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
    _write(module, sample_inputs(model, [expression or SAMPLE_TEXT]), path, format)
    write_gate_pattern(pattern_path(path), model.layout, gates, expression)
    return module


def _write(module: nn.Module, example, path: Path, format: str = "onnx"):
    with torch.no_grad(), warnings.catch_warnings(), quiet_transformers():
        # silenced: the tracer's notes on Python values (constants here: one pattern, one image
        # size), the legacy exporter's deprecation notice, transformers' notes on its attributes;
        # check_export runs the file instead
        warnings.simplefilter("ignore")
        if format == "onnx":
            _export_onnx(module, example, path)
        else:
            torch.jit.save(torch.jit.trace(module, example), str(path))


def pattern_path(path) -> Path:
    """Where :func:`export_subnet` writes the gate pattern of ``path``: ``NAME.gates.json``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.gates.json")


AXES = {"images": {0: "images"}, "pixel_mask": {0: "images"}, "image_index": {0: "batch"},
        **{name: {0: "batch", 1: "text_length"} for name in ("input_ids", "attention_mask", "text")},
        **{name: {0: "batch"} for name in ("boxes", "token_scores", "token_boxes", "layer_gates", "filter_gates")}}


def _export_onnx(module, example, path: Path):
    """The TorchScript-based exporter (``dynamo=False``): no ``onnxscript`` needed, and the
    batch, the number of images and the text length stay dynamic (docs/design.md §3a)."""
    if importlib.util.find_spec("onnx") is None:  # torch.onnx serialises with it
        raise LadsError(f"ONNX export needs the onnx package: {PIP}")
    names = [*module.input_names, *module.output_names]
    torch.onnx.export(module, example, str(path), input_names=module.input_names, output_names=module.output_names,
                      dynamic_axes={name: AXES[name] for name in names}, opset_version=17, dynamo=False)


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
    outputs = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    return [torch.from_numpy(o) for o in outputs]


def check_export(model, module: ExportedSubnet, path, format: str, expression: str | None = None) -> float:
    """Max |Δ| between the exported file's ``boxes`` and PyTorch's (``module``) on the same
    inputs: ``expression`` and a longer one, so that the batch and the padding differ from the
    example the export was traced with."""
    inputs = sample_inputs(model, [expression or SAMPLE_TEXT, LONGER_TEXT], seed=1, bank=module.bert is None)
    exported = run_exported(path, format, inputs)[0]
    with torch.no_grad():
        expected = module(*inputs)[0]
    if exported.shape != expected.shape:
        raise LadsError(f"{path}: boxes of shape {tuple(exported.shape)}, expected {tuple(expected.shape)}")
    return float((exported - expected).abs().max())


# ----------------------------------------------------------------------------- a bank


def pattern_counts(model, expressions: list[str], batch_size: int = 256) -> list[tuple[bytes, Gates, int]]:
    """The gate patterns the gating network chooses for ``expressions``, most frequent first:
    (``lads.inference.gate_key``, the (1, ·) hard gates, how many expressions chose it)."""
    from lads.inference import gate_key

    found: dict[bytes, list] = {}
    for start in range(0, len(expressions), batch_size):
        gates = expression_gates(model, expressions[start : start + batch_size])
        for row in range(len(gates)):
            found.setdefault(gate_key(gates, row), [gates.map(lambda g: g[row : row + 1]), 0])[1] += 1
    return sorted(((k, g, n) for k, (g, n) in found.items()), key=lambda t: -t[2])


def export_bank(model, expressions: list[str], folder, coverage: float = 0.95, source: dict | None = None,
                check: bool = True) -> dict:
    """Write the bank of the module's docstring for a split's ``expressions`` to ``folder``:
    the gating network, the subnets of the most frequent patterns up to ``coverage`` of the
    expressions, the dense network, the tokenizer and ``bank.json`` (returned). With ``check``,
    each file runs under onnxruntime beside PyTorch (``max_abs_diff``: the largest box
    difference). ``source``: a note for the index (data and split). ``model`` on the CPU.

    Args:
        model: a :class:`~lads.models.lads.LADS` in eval mode on the CPU.
        expressions: the expressions of a split; their gate patterns, most frequent first,
            choose the subnets.
        folder: the bank folder to write; replaced whole (written beside it, then moved) if it
            holds a bank already.
        coverage: the share of ``expressions`` whose own pattern the bank must hold, in (0, 1]
            (default 0.95).
        source: a note for the index's ``split`` entry, e.g. ``{"data": …, "split": …}``
            (default None).
        check: run each file under onnxruntime beside PyTorch (default True; needs
            onnxruntime).

    Returns:
        The bank's index, as written to ``bank.json``: ``format``, ``image_size``,
        ``max_tokens``, ``head``, the gate counts, ``gating``, ``tokenizer``, ``subnets`` (per
        file: ``file``, ``pattern``, ``expressions``, ``share``, ``flops``), ``dense``, ``split``
        (the coverage reached), ``flops_at_tokens`` and, with ``check``, ``max_abs_diff``.

    Raises:
        LadsError: for ``coverage`` outside (0, 1], no expressions, a model in training mode or
            off the CPU, ``check`` without onnxruntime, a ``folder`` that exists and is not a
            bank, a tokenizer without ``tokenizer.json``, or, with ``check``, a gating file
            whose gates differ from PyTorch's under onnxruntime.
    """
    if not 0 < coverage <= 1:
        raise LadsError(f"coverage must be above 0 and at most 1, got {coverage}")
    if not expressions:
        raise LadsError("export_bank: no expressions to choose the subnets by")
    if model.training or next(model.parameters()).device.type != "cpu":
        raise LadsError("export_bank: the model must be in eval mode on the CPU (model.eval().cpu())")
    if check and importlib.util.find_spec("onnxruntime") is None:
        raise LadsError(f"checking the bank needs onnxruntime: {PIP}")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / BANK_INDEX).exists())):
        raise LadsError(f"{folder}: exists and is not a bank (no {BANK_INDEX}); choose another folder")
    counts = pattern_counts(model, expressions)
    chosen, covered = [], 0
    for key, gates, n in counts:
        if covered >= coverage * len(expressions):
            break
        chosen.append((key, gates, n))
        covered += n
    every = Gates(torch.ones(1, model.layout.num_layer_gates), torch.ones(1, model.layout.num_filter_gates))
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        entries, diff = _write_bank(model, tmp, [*chosen, (None, every, 0)], len(expressions), check)
        index = {"format": BANK_FORMAT, "image_size": model.config.image_size,
                 "max_tokens": model.config.text.max_tokens, "head": model.config.head,
                 "layer_gates": model.layout.num_layer_gates, "filter_gates": model.layout.num_filter_gates,
                 "gating": "gating.onnx", "tokenizer": "text/tokenizer.json", "subnets": entries[:-1],
                 "dense": entries[-1],
                 "split": {**(source or {}), "expressions": len(expressions), "patterns": len(counts),
                           "coverage": coverage, "covered": round(covered / len(expressions), 6)},
                 "flops_at_tokens": 10, **({"max_abs_diff": diff} if check else {})}
        (tmp / BANK_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return index


def _write_bank(model, folder: Path, patterns: list, total: int, check: bool) -> tuple[list[dict], float]:
    """The tokenizer, ``gating.onnx`` and one file per pattern ((key, gates, count); key None:
    ``dense.onnx``) in ``folder``: their index entries, and the largest box difference of a
    file against PyTorch (0 without ``check``)."""
    from lads.inference import gate_key

    tokenizer_files = model.tokenizer.save_pretrained(str(folder / "text"))
    if not (folder / "text" / "tokenizer.json").exists():
        raise LadsError(f"the text backbone's tokenizer has no tokenizer.json (wrote {tokenizer_files}): "
                        "the runtime reads a fast tokenizer")
    gating = ExportedGating(model)
    _write(gating, sample_inputs(model, [SAMPLE_TEXT])[2:], folder / "gating.onnx")
    if check:
        _check_gating(model, gating, folder / "gating.onnx")
    entries, diff = [], 0.0
    for i, (key, gates, n) in enumerate(patterns):
        name = "dense.onnx" if key is None else f"subnet-{i:03d}.onnx"
        module = ExportedSubnet(model, gates, bank=True)
        _write(module, sample_inputs(model, [SAMPLE_TEXT], bank=True), folder / name)
        if check:
            diff = max(diff, check_export(model, module, folder / name, "onnx"))
        entries.append({"file": name, "pattern": gate_key(gates, 0).hex(), "expressions": n,
                        "share": round(n / total, 6), "flops": round(model.subnet_flops(gates, 0, 10), 4)})
    return entries, diff


def _check_gating(model, gating: ExportedGating, path: Path):
    """A ``LadsError`` unless the file's gates equal PyTorch's on two expressions."""
    _, _, ids, mask = sample_inputs(model, [SAMPLE_TEXT, LONGER_TEXT])
    exported = run_exported(path, "onnx", (ids, mask))
    with torch.no_grad():
        expected = gating(ids, mask)
    for name, a, b in zip(gating.output_names[1:], exported[1:], expected[1:]):
        if not torch.equal(a, b):
            raise LadsError(f"{path}: under onnxruntime the {name} differ from PyTorch's")
