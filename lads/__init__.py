"""lads: referring expression comprehension with Language Adaptive Dynamic Subnets."""

__version__ = "0.1.0"

__all__ = ["LADS", "build_model", "load_config", "__version__"]


def __getattr__(name):  # lazy, so that ``lads --help`` does not import torch
    if name in ("LADS", "build_model"):
        from lads import models

        return getattr(models, name)
    if name == "load_config":
        from lads.config import load_config

        return load_config
    raise AttributeError(f"module 'lads' has no attribute {name!r}")
