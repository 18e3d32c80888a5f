"""Mixed precision: ``train.amp`` as an autocast context, and the float32 regions inside it.

Boxes and gates stay in float32 under autocast: bf16 keeps 8 bits of mantissa, a box coordinate
of a 512 px image would move in steps of up to 2 px, and gate noise and the MI term (Eq. 8) need
more than that near 0 and 1.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from lads.errors import LadsError

AMP = {"none": None, "bf16": torch.bfloat16}


def check_amp(amp: str) -> None:
    if amp not in AMP:
        raise LadsError(f"train.amp must be one of {', '.join(AMP)}, got {amp!r}")


def autocast(device: torch.device, amp: str):
    """The context ``train.amp`` asks for on ``device`` (CPU or CUDA)."""
    check_amp(amp)
    if AMP[amp] is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP[amp])


def full_precision(x: torch.Tensor):
    """A region where autocast is off (cast the inputs with ``.float()``)."""
    return torch.autocast(x.device.type, enabled=False)
