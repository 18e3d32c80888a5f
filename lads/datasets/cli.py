"""``lads data synth``, ``lads data stats`` and ``lads data index``."""

from __future__ import annotations

import importlib

SUBCOMMANDS = {
    "synth": ("lads.datasets.synth", "generate the synthetic REC benchmark (REFER format)"),
    "stats": ("lads.datasets.stats", "per-split statistics of one or more datasets"),
    "index": ("lads.datasets.index", "build the record tables of a config's mixture (once, before training)"),
}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(data_module=module)
        importlib.import_module(module).add_arguments(p)


def run(args):
    return importlib.import_module(args.data_module).run(args)
