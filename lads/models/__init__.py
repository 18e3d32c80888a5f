"""Models: the LADS supernet and its parts."""

from lads.models.gating import Gates
from lads.models.lads import LADS, build_model

__all__ = ["Gates", "LADS", "build_model"]
