"""``lads export``: ONNX (under onnxruntime) and TorchScript round trips on the tiny preset, gate
pattern files, and the messages for bad input."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lads import export
from lads.cli import main
from lads.errors import LadsError
from lads.models.subnet import random_gates

ATOL = 1e-5  # normalised box coordinates (5e-4 px at 512 px); seen: below 1e-6
EXPRESSIONS = ["the red circle", "the big blue square left of the small green star"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_text_dir):
    """The tiny preset with a 2-layer random BERT, saved as a checkpoint with its tokenizer; a
    few training-mode forwards first, so that the batch norms fold non-trivial statistics."""
    from transformers import AutoTokenizer

    from lads.config import load_config, to_dict
    from lads.models import LADS
    from lads.util.checkpoint import save_checkpoint

    cfg = load_config("tiny", [f"model.text.name={tiny_text_dir}", "model.text.num_layers=2"])
    torch.manual_seed(0)
    model = LADS(cfg.model).train()
    size = cfg.model.image_size
    with torch.no_grad():
        for _ in range(3):
            ids = torch.randint(1000, 5000, (4, 6))
            model(torch.randn(4, 3, size, size), torch.zeros(4, size, size, dtype=torch.bool), ids,
                  torch.ones_like(ids))
    path = tmp_path_factory.mktemp("export") / "checkpoint"
    return save_checkpoint(path, model.eval(), to_dict(cfg), {}, tokenizer=AutoTokenizer.from_pretrained(tiny_text_dir))


@pytest.fixture(scope="module")
def model(checkpoint):
    from lads.models.pretrained import load_model

    return load_model(checkpoint)[0]


def closed_groups(layout):
    """Whole groups closed: every filter of three bottlenecks whose layer runs (layer1.0 and
    layer3.0 with a projection, layer1.1 with its layer gate open), the layer gates of layer2,
    and two fusion sublayers."""
    gates = random_gates(layout, 0.6, generator=torch.Generator().manual_seed(3))
    gates.layer.fill_(1)
    for i in (0, 1, 7):
        gates.filter[0, layout.filter_slices[i]] = 0
    for name in ("layer2.1", "layer2.2", "layer2.3", "fusion.0.attn", "fusion.1.ffn"):
        gates.layer[0, layout.layer_slot[layout.names.index(name)]] = 0
    return gates


PATTERNS = {
    "keep-half": lambda layout: random_gates(layout, 0.5, generator=torch.Generator().manual_seed(0)),
    "closed-groups": closed_groups,
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_round_trip_matches_pytorch_subnet(model, tmp_path, format, pattern):
    """The file (traced at batch 1) run at batch 2 on another text length gives the boxes of the
    subnet PyTorch extracts (unfolded, text through ``encode_text``), head and token head."""
    gates = PATTERNS[pattern](model.layout)
    path = tmp_path / f"subnet{export.FORMATS[format]}"
    module = export.export_subnet(model, path, gates=gates, format=format)
    assert module.output_names == ["boxes", "token_scores", "token_boxes"]  # tiny: model.head=token

    inputs = export.sample_inputs(model, EXPRESSIONS, seed=1)
    images, pixel_mask, input_ids, attention_mask = inputs
    assert attention_mask[0].sum() < attention_mask.shape[1]  # the first row has padding
    with torch.no_grad():
        expected = model.extract_subnet(gates)(images, pixel_mask, *model.encode_text(input_ids, attention_mask))
    boxes, scores, token_boxes = export.run_exported(path, format, inputs)
    torch.testing.assert_close(boxes, expected["boxes"], atol=ATOL, rtol=0)
    torch.testing.assert_close(token_boxes, expected["token_boxes"], atol=ATOL, rtol=0)
    torch.testing.assert_close(scores, expected["token_scores"], atol=ATOL, rtol=0)  # -inf on padding alike
    assert export.check_export(model, module, path, format, "the red circle") < ATOL


def test_paper_head_exports_boxes_only(tiny_text_dir, tmp_path):
    """``model.head=cls`` without a token head: the one output is the [CLS] head's boxes."""
    from lads.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", [f"model.text.name={tiny_text_dir}", "model.text.num_layers=2", "model.head=cls",
                                 "model.loss.token=0", "model.loss.token_box=0"]).eval()
    module = export.export_subnet(model, tmp_path / "cls.onnx", gates=closed_groups(model.layout))
    assert module.output_names == ["boxes"]
    assert export.check_export(model, module, tmp_path / "cls.onnx", "onnx", "the red circle") < ATOL


@pytest.mark.parametrize("pattern", PATTERNS)
def test_onnx_graph_holds_only_the_subnet(model, tmp_path, pattern):
    """One Conv node per convolution of the (folded) subnet: closed layers and filters are gone."""
    import onnx

    gates = PATTERNS[pattern](model.layout)
    module = export.export_subnet(model, tmp_path / "subnet.onnx", gates=gates)
    graph = onnx.load(str(tmp_path / "subnet.onnx")).graph
    subnet = module.subnet
    convs = 1 + sum(len(b.branch or ()) + (b.downsample is not None) for b in subnet.blocks) + 1  # stem, visual_proj
    assert sum(node.op_type == "Conv" for node in graph.node) == convs
    assert sum(node.op_type == "BatchNormalization" for node in graph.node) == 0
    assert [i.name for i in graph.input] == list(export.INPUTS)


def test_gate_pattern_file_round_trip(model, tmp_path):
    gates = closed_groups(model.layout)
    path = export.write_gate_pattern(tmp_path / "p.gates.json", model.layout, gates, "the red circle")
    pattern = json.loads(path.read_text())
    assert pattern["layer"]["layer2.1"] == 0 and pattern["filter"]["layer1.0"] == "0" * 16
    read, expression = export.read_gate_pattern(path, model.layout)
    assert expression == "the red circle"
    assert torch.equal(read.layer, gates.layer) and torch.equal(read.filter, gates.filter)


def test_cli_exports_a_gate_pattern_file(model, checkpoint, tmp_path, capsys):
    """``--gates FILE``: the file's subnet, checked under onnxruntime; its pattern is written
    back beside it unchanged."""
    gates = closed_groups(model.layout)
    pattern = export.write_gate_pattern(tmp_path / "in.gates.json", model.layout, gates, "the star")
    out = tmp_path / "deploy" / "star.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--gates", str(pattern), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "checked: onnxruntime boxes match PyTorch's" in printed
    assert model.layout.summary(gates)["summary"] in printed
    assert (tmp_path / "deploy" / "star.gates.json").read_text() == pattern.read_text()


def test_cli_exports_an_expression(model, checkpoint, tmp_path, capsys, monkeypatch):
    """``--expr TEXT``: the gates the gating network chooses for it; TorchScript, default name."""
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--checkpoint", str(checkpoint), "--expr", "the red circle", "--format", "torchscript"]) == 0
    assert "checked: torch.jit.load boxes match PyTorch's" in capsys.readouterr().out
    read, expression = export.read_gate_pattern(tmp_path / "subnet.gates.json", model.layout)
    expected = export.expression_gates(model, "the red circle")
    assert expression == "the red circle" and torch.equal(read.layer, expected.layer)
    assert (tmp_path / "subnet.pt").is_file()


def test_cli_bad_arguments(checkpoint, tmp_path, capsys):
    def error(*args) -> str:
        try:
            assert main(["export", *map(str, args)]) == 2
        except SystemExit as e:  # argparse
            assert e.code == 2
        return capsys.readouterr().err

    assert "--format: invalid choice: 'tflite'" in error("--checkpoint", checkpoint, "--expr", "x",
                                                         "--format", "tflite")
    assert "one of the arguments --expr --gates --bank is required" in error("--checkpoint", checkpoint)
    assert error("--checkpoint", tmp_path / "nowhere", "--expr", "x").startswith(
        f"lads export: error: checkpoint {tmp_path / 'nowhere'}: no such folder")
    assert f"--gates {tmp_path / 'none.json'}: no such file" in error("--checkpoint", checkpoint, "--gates",
                                                                       tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"layer": {}, "filter": {}}')
    assert error("--checkpoint", checkpoint, "--gates", bad).startswith(
        f'lads export: error: {bad}: "layer" must have exactly the keys layer1.1, ')


@pytest.mark.parametrize("edit,message", [
    (lambda p: "{not json", "not a JSON file"),
    (lambda p: [1, 0], 'expected an object with keys "layer", "filter"'),
    (lambda p: {**p, "gates": 1}, 'expected an object with keys "layer", "filter"'),
    (lambda p: {**p, "layer": {k: v for k, v in p["layer"].items() if k != "fusion.3.ffn"}},
     "missing: fusion.3.ffn, unknown: none"),
    (lambda p: {**p, "layer": {**p["layer"], "layer1.0": 1}}, "missing: none, unknown: layer1.0"),
    (lambda p: {**p, "layer": {**p["layer"], "layer1.1": 2}}, '"layer.layer1.1" must be 0 or 1, got 2'),
    (lambda p: {**p, "layer": {**p["layer"], "layer1.1": True}}, '"layer.layer1.1" must be 0 or 1, got True'),
    (lambda p: {**p, "filter": {**p["filter"], "layer2.0": "101"}}, '"filter.layer2.0" must be a string of 32'),
    (lambda p: {**p, "filter": {**p["filter"], "layer2.0": [1] * 32}}, '"filter.layer2.0" must be a string of 32'),
    (lambda p: {**p, "filter": 7}, '"filter" must be an object keyed by layer1.0, '),
], ids=["not-json", "a-list", "unknown-key", "missing-gate", "no-layer-gate", "not-a-bit", "a-bool",
        "short", "a-list-of-bits", "filter-not-an-object"])
def test_malformed_pattern_file_names_the_file(model, tmp_path, edit, message):
    good = json.loads(export.write_gate_pattern(tmp_path / "good.json", model.layout,
                                                random_gates(model.layout, 0.5)).read_text())
    path = tmp_path / "bad.gates.json"
    edited = edit(good)
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(LadsError, match=f"^{path}: ") as caught:
        export.read_gate_pattern(path, model.layout)
    assert message in str(caught.value)


def test_missing_packages_name_the_pip_command(model, checkpoint, tmp_path, monkeypatch, capsys):
    """Without onnxruntime the file is written and not checked, with a warning; without onnx
    nothing is written."""
    gates = random_gates(model.layout, 0.5)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(LadsError, match=r"needs onnxruntime: pip install 'lads\[export\]'"):
        export.run_exported(tmp_path / "subnet.onnx", "onnx", export.sample_inputs(model, ["x"]))
    assert main(["export", "--checkpoint", str(checkpoint), "--expr", "x", "--out", str(tmp_path / "a.onnx")]) == 0
    assert f"lads export: warning: {tmp_path / 'a.onnx'} not checked: onnxruntime is not installed (pip install " \
           in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(LadsError, match=r"needs the onnx package: pip install 'lads\[export\]'"):
        export.export_subnet(model, tmp_path / "b.onnx", gates=gates)
    assert not (tmp_path / "b.onnx").exists()


def test_library_bad_arguments(model, tmp_path):
    with pytest.raises(LadsError, match="format must be one of onnx, torchscript, got 'tflite'"):
        export.export_subnet(model, tmp_path / "x", expression="the red circle", format="tflite")
    with pytest.raises(LadsError, match="give an expression or a gate pattern"):
        export.export_subnet(model, tmp_path / "x")
    model.train()
    try:
        with pytest.raises(LadsError, match=r"eval mode on the CPU \(model.eval\(\).cpu\(\)\)"):
            export.export_subnet(model, tmp_path / "x.onnx", expression="the red circle")
    finally:
        model.eval()
