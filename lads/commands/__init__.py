"""The subcommands of ``lads`` (``lads.cli``), one module each: ``add_arguments(parser)`` and
``run(args)``. The library (models, datasets, engine, inference, analysis, util) never imports
from here; here are the options every command that runs a config shares.
"""

from __future__ import annotations


def add_config_arguments(parser, out_key: str | None = None, default: str = "tiny", data: bool = True) -> None:
    """``--config`` (default ``default``), ``--set`` and, with ``data``, ``--data`` and, given
    ``out_key``, ``--out``, which sets ``out_key``."""
    parser.add_argument("--config", default=default, help=f"preset name or JSON config file (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. train.epochs=10 (repeatable)")
    if data:
        parser.add_argument("--data", help="shortcut for --set data.path=PATH")
    if out_key:
        parser.add_argument("--out", help=f"shortcut for --set {out_key}=DIR")


def config_overrides(args, out_key: str | None = None) -> list[str]:
    """The ``--set`` values, then ``--data`` and (given ``out_key``) ``--out`` as overrides."""
    return [*args.overrides, *([f"data.path={args.data}"] if getattr(args, "data", None) else []),
            *([f"{out_key}={args.out}"] if out_key and args.out else [])]
