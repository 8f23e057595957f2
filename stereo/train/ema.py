"""Exponential moving average of the trainable weights; used for validation and export, saved in checkpoints."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        # fp32 shadow even when the module trains in bf16/fp16: a 0.9999 decay vanishes in bf16 rounding
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.shadow)
        current = [self.params[n].detach().float() for n in names]
        torch._foreach_lerp_([self.shadow[n] for n in names], current, 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the averaged weights into the module (validation), restoring the live ones after."""
        with torch.no_grad():
            live = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(live[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {n: t.clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model's trainable parameters: {sorted(missing)[:5]}")
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)
