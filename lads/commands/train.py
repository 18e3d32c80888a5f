"""``lads train --config FILE|PRESET [--set key=value …] [--resume DIR]``; works under torchrun."""

from __future__ import annotations

import json


def add_arguments(parser):
    from lads.config import add_config_arguments

    add_config_arguments(parser, "train.out")
    parser.add_argument("--dense", action="store_true", help="train the dense baseline (model.dense=true)")
    parser.add_argument("--resume", metavar="DIR", help="continue a run from its checkpoint (its own config)")


def run(args):
    from lads.config import apply_overrides, config_from_dict, config_overrides, load_raw
    from lads.engine import train
    from lads.util.checkpoint import read_meta

    overrides = config_overrides(args, "train.out") + (["model.dense=true"] if args.dense else [])
    if args.resume:
        _, saved, _ = read_meta(args.resume)
        raw = apply_overrides(saved, overrides)
    else:
        raw = apply_overrides(load_raw(args.config), overrides)
    cfg = config_from_dict(json.loads(json.dumps(raw)))
    train(cfg, resume=args.resume)
