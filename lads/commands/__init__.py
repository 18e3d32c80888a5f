"""The subcommands of ``lads`` (``lads.cli``), one module each: ``add_arguments(parser)`` and
``run(args)``. A command only parses its arguments and calls the library (models, datasets,
engine, evaluation, inference, analysis, demo, serve, bench, util); nothing imports a command but
``lads.cli``. The options every command that runs a config shares are ``lads.config``'s
``add_config_arguments`` and ``config_overrides``.
"""
