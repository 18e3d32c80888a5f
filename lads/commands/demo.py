"""``lads demo``: the main job on the embedded default, the synthetic REC benchmark (``lads.demo``)."""

from __future__ import annotations


def add_arguments(parser):
    from lads.config import add_config_arguments

    add_config_arguments(parser, data=False)
    parser.add_argument("--out", default="runs/demo", help="where everything goes (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic benchmark (default: 0)")


def run(args):
    from lads.demo import run_demo

    run_demo(args.config, args.overrides, args.out, args.seed)
