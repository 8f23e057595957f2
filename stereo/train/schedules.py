"""Learning-rate multipliers: pure functions of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math

from stereo.config.schema import ScheduleConfig


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Factor applied to the peak learning rate at optimizer step `step` (0-based) of `total_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "step":
        return cfg.decay_factor if step >= cfg.decay_at * total_steps else 1.0
    # cosine and onecycle measure progress after the warmup
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.kind == "cosine":
        return cfg.min_ratio + (1.0 - cfg.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.kind == "onecycle":
        # linear rise from min_ratio to 1 over pct_start, then cosine annealing down to min_ratio
        if progress < cfg.pct_start:
            return cfg.min_ratio + (1.0 - cfg.min_ratio) * progress / cfg.pct_start
        down = (progress - cfg.pct_start) / max(1.0 - cfg.pct_start, 1e-12)
        return cfg.min_ratio + (1.0 - cfg.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * down))
    raise ValueError(f"schedule.kind: unknown kind {cfg.kind!r}")
