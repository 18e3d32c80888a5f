"""The ``lads`` command. Each subcommand lives in its own module of ``lads.commands``,
imported only when used; it provides ``add_arguments(parser)`` and ``run(args) -> int | None``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from lads import __version__

COMMANDS = {
    "demo": ("lads.commands.demo",
             "the main job: synthetic benchmark, train LADS and dense, evaluate, predict, report"),
    "info": ("lads.commands.info", "build a model and print its structure and parameter counts"),
    "data": ("lads.commands.data", "generate the synthetic benchmark, inspect datasets"),
    "pretrain": ("lads.commands.pretrain", "detection pre-training of the visual backbone on a dataset's boxes"),
    "train": ("lads.commands.train", "train LADS or the dense baseline (one process, or many with torchrun)"),
    "eval": ("lads.commands.evaluate", "Prec@0.5 per split, time per expression, subnet sizes"),
    "predict": ("lads.commands.predict",
                "boxes for your own images and expressions: one image, or a JSON-lines file or folder of them"),
    "export": ("lads.commands.export", "write one expression's subnet as ONNX or TorchScript for deployment"),
    "bench": ("lads.commands.bench", "time and count FLOPs of dense, masked and extracted subnets"),
    "analyze": ("lads.commands.analyze", "see the subnets over a split: selection rates, t-SNE, drawings, word clouds"),
    "serve": ("lads.commands.serve", "a web page to try a model, and an HTTP API to call it"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="lads", description="Referring expression comprehension with LADS."
    )
    parser.add_argument("--version", action="version", version=f"lads {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:
            chosen = importlib.import_module(module)
            chosen.add_arguments(p)
    args = parser.parse_args(argv)
    if chosen is None:
        parser.print_help()
        return 0
    from lads.errors import LadsError
    from lads.util.dist import cleanup

    command = " ".join(filter(None, [args.command, getattr(args, "data_command", None)]))
    with warnings.catch_warnings():  # warnings as one line each, as errors are
        warnings.showwarning = lambda message, *_, **__: print(f"lads {command}: warning: {message}", file=sys.stderr)
        try:
            return chosen.run(args) or 0
        except LadsError as e:
            print(f"lads {command}: error: {e}", file=sys.stderr)
            return 2
        finally:
            cleanup()


if __name__ == "__main__":
    sys.exit(main())
