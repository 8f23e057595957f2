"""Validation during training: the held-out samples evaluated with the EMA weights, scalars and panels logged."""

from __future__ import annotations

import contextlib
import math
import sys

import torch
import torch.distributed as dist

from stereo.config import Config

VAL_PANELS = 2  # validation images logged (the first held-out samples' labelled panels)


class Validator:
    """E's evaluate() on the held-out samples with the EMA weights: on rank 0 while the others wait at a barrier;
    under ZeRO-3 on every rank (its forward gathers the partitioned weights collectively), logged by rank 0."""

    def __init__(self, cfg: Config, module: torch.nn.Module, ema, env, log):
        self.cfg, self.module, self.ema, self.env, self.log = cfg, module, ema, env, log
        self.epe: dict[str, float] = {}

    def run(self, step: int, label: str | None = None) -> dict[str, float]:
        """The logged scalars (on the ranks that validated; {} on the others)."""
        scalars: dict[str, float] = {}
        if not self.cfg.data.val:
            return scalars
        if self.env.rank == 0 or self.cfg.deepspeed.zero_stage == 3:
            from stereo.data.loader import count_val_samples, iter_val_samples
            from stereo.eval.runner import evaluate

            was_training = self.module.training
            self.module.eval()
            with (self.ema.applied() if self.ema is not None else contextlib.nullcontext()), torch.no_grad():
                metrics = evaluate(self.module, iter_val_samples(self.cfg.data), self.cfg.model.valid_iters,
                                   self.env.device, max_disp=self.cfg.model.max_disp, title=f"validation {step}",
                                   progress=self.env.rank == 0, total=count_val_samples(self.cfg.data),
                                   keep_panels=VAL_PANELS)
            self.module.train(was_training)
            scalars = {f"val/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self.log.log(step, scalars)
            for index, panel in enumerate(metrics["panels"]):
                self.log.log_image(step, f"val/disparity_{index}", panel)
            epe = scalars.get("val/epe/pooled", math.nan)
            if label:
                self.epe[label] = epe
            if self.env.rank == 0:
                print(f"validation at step {step}: EPE {epe:.3f}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.barrier()
        return scalars

    def print_summary(self) -> None:
        if self.env.rank == 0 and "before" in self.epe and "after" in self.epe:
            print(f"validation EPE before training {self.epe['before']:.3f} -> after {self.epe['after']:.3f} "
                  f"(EMA weights, {self.cfg.data.val[0].name})", flush=True)
