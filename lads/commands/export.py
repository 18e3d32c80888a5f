"""``lads export``: the static subnet of one expression, or of a gate pattern file, as an ONNX
or TorchScript file for deployment (the library: ``lads.deploy``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lads.errors import LadsError, warn


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a trained model's checkpoint folder (e.g. runs/demo/lads/checkpoint)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--expr", metavar="TEXT", help="export the subnet this expression's gates choose")
    which.add_argument("--gates", metavar="FILE.json",
                       help="export the subnet of this gate pattern file (each export writes one: NAME.gates.json)")
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx",
                        help="onnx (runs under onnxruntime; needs pip install 'lads[export]') or torchscript "
                             "(default: onnx)")
    parser.add_argument("--out", metavar="FILE", help="the file to write (default: subnet.onnx or subnet.pt)")
    parser.add_argument("--no-check", action="store_true",
                        help="do not run the written file against PyTorch (onnxruntime for ONNX)")


def run(args):
    from lads import deploy
    from lads.util.checkpoint import load_model

    if args.gates and not Path(args.gates).is_file():
        raise LadsError(f"--gates {args.gates}: no such file")
    model, _ = load_model(args.checkpoint)
    gates, noted = deploy.read_gate_pattern(args.gates, model.layout) if args.gates else (None, None)
    expression = args.expr or noted
    out = Path(args.out or f"subnet{deploy.FORMATS[args.format]}")
    module = deploy.export_subnet(model, out, expression=expression, gates=gates, format=args.format)
    print(f"{out}: {model.layout.summary(module.gates)['summary']}; inputs {', '.join(deploy.INPUTS)}; "
          f"outputs {', '.join(module.output_names)}")
    print(f"gate pattern: {deploy.pattern_path(out)}")
    if not args.no_check:
        check(model, module, out, args.format, expression)


def check(model, module, path: Path, format: str, expression: str | None):
    """Run the file beside PyTorch (``deploy.check_export``); fail above the tolerance."""
    from lads import deploy

    if format == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        warn(f"{path} not checked: onnxruntime is not installed ({deploy.PIP})")
        return
    diff = deploy.check_export(model, module, path, format, expression)
    runner = "onnxruntime" if format == "onnx" else "torch.jit.load"
    if diff > deploy.TOLERANCE:
        raise LadsError(f"{path}: under {runner} the boxes differ from PyTorch's by {diff:.2e} "
                        f"(tolerance {deploy.TOLERANCE:g})")
    print(f"checked: {runner} boxes match PyTorch's, max |diff| {diff:.2e} (tolerance {deploy.TOLERANCE:g})")
