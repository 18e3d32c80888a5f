"""``lads pretrain``: detection pre-training of the visual backbone (``lads.pretrain``)."""

from __future__ import annotations


def add_arguments(parser):
    from lads.config import add_config_arguments

    add_config_arguments(parser, "pretrain.out")


def run(args):
    from lads.config import config_overrides, load_config
    from lads.pretrain import pretrain

    pretrain(load_config(args.config, config_overrides(args, "pretrain.out")))
