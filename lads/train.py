"""``lads train --config FILE|PRESET [--set key=value …] [--resume DIR]``; works under torchrun."""

from __future__ import annotations

import json


def add_arguments(parser):
    parser.add_argument("--config", default="tiny", help="preset name or JSON config file (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. train.epochs=10 (repeatable)")
    parser.add_argument("--data", help="shortcut for --set data.path=PATH")
    parser.add_argument("--out", help="shortcut for --set train.out=DIR")
    parser.add_argument("--dense", action="store_true", help="train the dense baseline (model.dense=true)")
    parser.add_argument("--resume", metavar="DIR", help="continue a run from its checkpoint (its own config)")


def run(args):
    from lads.config import apply_overrides, config_from_dict, load_raw
    from lads.engine import train
    from lads.util.checkpoint import read_meta

    overrides = list(args.overrides)
    overrides += [f"data.path={args.data}"] if args.data else []
    overrides += [f"train.out={args.out}"] if args.out else []
    overrides += ["model.dense=true"] if args.dense else []
    if args.resume:
        _, saved, _ = read_meta(args.resume)
        raw = apply_overrides(saved, overrides)
    else:
        raw = apply_overrides(load_raw(args.config), overrides)
    cfg = config_from_dict(json.loads(json.dumps(raw)))
    train(cfg, resume=args.resume)
