"""Precision islands: where the model computes in fp32 whatever the weights' precision or an enclosing autocast."""

from __future__ import annotations

import contextlib

import torch


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A region computed in fp32 even under autocast (nothing to switch off on devices without autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def upcast(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: half precision (and integer images) become fp32; fp64 stays, so the whole model can run in fp64
    (how it is checked against the released implementation)."""
    return t if t.dtype == torch.float64 else t.float()
