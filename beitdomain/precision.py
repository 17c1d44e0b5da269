"""The one mixed-precision context: every forward pass that may run in bf16 enters it.

It lives below models and the engine (and imports nothing but torch), so that models' own passes
(BatchNorm recalibration, probe features) and the engine's training step share it;
`beitdomain.engine.train.distributed` re-exports it.
"""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` (e.g. bf16) on `device` when `dtype` is set; a null context otherwise."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
