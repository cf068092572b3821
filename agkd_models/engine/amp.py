"""Mixed precision: the autocast modes the trainer and evaluation accept."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_MODES", "autocast"]

AMP_MODES = ("off", "bf16", "fp16")


def autocast(device: torch.device, amp: str):
    """The autocast context of ``amp`` (``"off"``, ``"bf16"``, ``"fp16"``) on ``device``."""
    if amp not in AMP_MODES:
        raise ValueError(f"train.amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
