"""Bad input: the one exception type (files, fields, arguments), and warnings about the input
that point at the caller's code."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

_INTERNAL = (str(Path(__file__).parent), str(Path(warnings.__file__).parent))


class LadsError(ValueError):
    """Bad input. The message names the file, field or argument; the CLI prints it alone."""


def warn(message: str) -> None:
    """A ``UserWarning`` attributed to the first frame outside lads and torch (the user's
    line, not a decorator inside torch); the CLI prints it as one line."""
    import torch

    internal = (*_INTERNAL, str(Path(torch.__file__).parent))
    frame, level = sys._getframe(1), 2  # stacklevel 1 is this function
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
