"""Precision islands: where the model computes in fp32 whatever the weights' precision or an enclosing autocast."""

from __future__ import annotations

import contextlib

import torch

from stereo.config.errors import ConfigError


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A region computed in fp32 even under autocast (nothing to switch off on devices without autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def upcast(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: half precision (and integer images) become fp32; fp64 stays, so the whole model can run in fp64
    (how it is checked against the released implementation)."""
    return t if t.dtype == torch.float64 else t.float()


def resolve_precision(precision: str, device: torch.device, name: str = "precision") -> str:
    """'auto' -> bf16 on a GPU, fp32 elsewhere; fp16 only on a GPU (`name` is the setting, for the error)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError(name, "fp32 or bf16 on the CPU (fp16 needs a GPU)")
    return precision


def autocast_to(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for a resolved 'bf16'/'fp16' (the model keeps its fp32 islands), nothing for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
