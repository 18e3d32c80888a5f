"""``lads export``: the static subnet of one expression, or of a gate pattern file, as an ONNX
or TorchScript file; or, with ``--bank``, the dynamic model as a folder of ONNX files that
``lads.deploy`` runs without torch (the library: ``lads.export``)."""

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
    which.add_argument("--bank", action="store_true",
                       help="export the dynamic model: the gating network, the subnets of the most frequent gate "
                            "patterns of --data's --split, and the dense network, as a folder for lads.deploy")
    parser.add_argument("--data", metavar="DIR", help="with --bank: the dataset whose expressions choose the subnets")
    parser.add_argument("--split", default="val", help="with --bank: its split (default: val)")
    parser.add_argument("--coverage", type=float, default=0.95,
                        help="with --bank: bank the most frequent patterns until they serve this share of the "
                             "split's expressions (default: 0.95)")
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx",
                        help="onnx (runs under onnxruntime; needs pip install 'lads[export]') or torchscript "
                             "(default: onnx)")
    parser.add_argument("--out", metavar="FILE",
                        help="the file to write (default: subnet.onnx or subnet.pt); with --bank, the folder "
                             "(default: bank)")
    parser.add_argument("--no-check", action="store_true",
                        help="do not run the written file against PyTorch (onnxruntime for ONNX)")


def run(args):
    from lads import export
    from lads.models.pretrained import load_model

    if args.bank:
        return run_bank(args)
    if args.gates and not Path(args.gates).is_file():
        raise LadsError(f"--gates {args.gates}: no such file")
    model, _ = load_model(args.checkpoint)
    gates, noted = export.read_gate_pattern(args.gates, model.layout) if args.gates else (None, None)
    expression = args.expr or noted
    out = Path(args.out or f"subnet{export.FORMATS[args.format]}")
    module = export.export_subnet(model, out, expression=expression, gates=gates, format=args.format)
    print(f"{out}: {model.layout.summary(module.gates)['summary']}; inputs {', '.join(export.INPUTS)}; "
          f"outputs {', '.join(module.output_names)}")
    print(f"gate pattern: {export.pattern_path(out)}")
    if not args.no_check:
        check(model, module, out, args.format, expression)


def check(model, module, path: Path, format: str, expression: str | None):
    """Run the file beside PyTorch (``lads.export.check_export``); fail above the tolerance."""
    from lads import export

    if format == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        warn(f"{path} not checked: onnxruntime is not installed ({export.PIP})")
        return
    diff = export.check_export(model, module, path, format, expression)
    runner = "onnxruntime" if format == "onnx" else "torch.jit.load"
    if diff > export.TOLERANCE:
        raise LadsError(f"{path}: under {runner} the boxes differ from PyTorch's by {diff:.2e} "
                        f"(tolerance {export.TOLERANCE:g})")
    print(f"checked: {runner} boxes match PyTorch's, max |diff| {diff:.2e} (tolerance {export.TOLERANCE:g})")


def run_bank(args):
    from lads.datasets import load_records
    from lads.export import TOLERANCE, export_bank
    from lads.models.pretrained import load_model

    if args.format != "onnx":
        raise LadsError("--bank writes ONNX files (--format onnx)")
    if not args.data:
        raise LadsError("--bank needs --data DIR (and --split): its expressions choose the subnets")
    if not 0 < args.coverage <= 1:
        raise LadsError(f"--coverage must be above 0 and at most 1, got {args.coverage}")
    records, _ = load_records(args.data, args.split)
    model, _ = load_model(args.checkpoint)
    out = Path(args.out or "bank")
    index = export_bank(model, [r.expression for r in records], out, args.coverage,
                        {"data": str(args.data), "split": args.split}, check=not args.no_check)
    split, size = index["split"], sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {len(index['subnets'])} subnets of {split['patterns']} gate patterns serve "
          f"{100 * split['covered']:.1f} % of the {split['expressions']} expressions of {args.split} by their own "
          f"subnet; gating.onnx, dense.onnx, text/, bank.json; {size / 2**20:.1f} MiB")
    if "max_abs_diff" in index:
        if index["max_abs_diff"] > TOLERANCE:
            raise LadsError(f"{out}: under onnxruntime the boxes differ from PyTorch's by {index['max_abs_diff']:.2e} "
                            f"(tolerance {TOLERANCE:g})")
        print(f"checked: onnxruntime boxes match PyTorch's, max |diff| {index['max_abs_diff']:.2e}; "
              "the gates are equal")
