"""Mixed precision: ``train.amp`` (and ``--dtype`` of bench, eval, predict, serve) as an
autocast context, the float32 regions inside it, and the gradient scaler fp16 needs.

Boxes and gates stay in float32 under autocast: bf16 keeps 8 bits of mantissa, a box coordinate
of a 512 px image would move in steps of up to 2 px, and gate noise and the MI term (Eq. 8) need
more than that near 0 and 1. fp16 has the mantissa but not the range: its training scales the
loss (``torch.amp.GradScaler``), bf16's does not need to.

``train.amp=auto`` takes bf16 where the device computes it natively and float32 elsewhere: on a
CPU without AVX512-BF16 or AMX, oneDNN emulates bf16 and a ``tiny`` step is ~1.5× slower than in
float32 (docs/design.md §5a).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from lads.errors import LadsError

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}  # --dtype of the commands -> amp


def check_amp(amp: str, what: str = "train.amp") -> None:
    if amp not in AMP:
        raise LadsError(f"{what} must be one of {', '.join(AMP)}, got {amp!r}")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products in hardware (CUDA: Ampere on; CPU:
    AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_amp(amp: str, device: torch.device) -> str:
    """``train.amp`` itself, or for ``auto`` what this device does fast: ``bf16`` or ``none``."""
    if amp == "auto":
        return "bf16" if native_bf16(device) else "none"
    if amp not in AMP:
        raise LadsError(f"train.amp must be one of {', '.join(AMP)} or auto, got {amp!r}")
    return amp


def autocast(device: torch.device, amp: str):
    """The context ``amp`` asks for on ``device`` (CPU or CUDA)."""
    check_amp(amp)
    if AMP[amp] is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP[amp])


def amp_dtype(amp: str) -> torch.dtype:
    """The dtype the matrix products run in: float32 for ``none``."""
    check_amp(amp)
    return AMP[amp] or torch.float32


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 training; a pass-through for ``none`` and ``bf16``."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def full_precision(x: torch.Tensor):
    """A region where autocast is off (cast the inputs with ``.float()``)."""
    return torch.autocast(x.device.type, enabled=False)
