"""lads: referring expression comprehension with Language Adaptive Dynamic Subnets."""

__version__ = "0.1.0"

# name -> module; imported on first use, so that ``lads --help`` does not import torch
_LAZY = {"LADS": "lads.models", "build_model": "lads.models", "load_config": "lads.config",
         "load_records": "lads.datasets"}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lads' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
