"""``lads data index --config FILE|PRESET [--set key=value …]``: build the record tables of a
config's ``data.mixture`` in ``data.index_dir`` once, before a run on many processes or machines,
and say what each source holds, skips and loses to the leak-free exclusion."""

from __future__ import annotations


def add_arguments(parser):
    from lads.cli import add_config_arguments

    add_config_arguments(parser, None)


def run(args):
    from lads.cli import config_overrides
    from lads.config import load_config
    from lads.datasets.mixture import load_mixture, table_folder
    from lads.errors import LadsError

    cfg = load_config(args.config, config_overrides(args, None))
    if not cfg.data.mixture:
        raise LadsError(f"{args.config}: no data.mixture to index")
    load_mixture(cfg.data)
    for source in cfg.data.mixture:
        print(f"{source.path}: {table_folder(source, cfg.data.index_dir)}")
