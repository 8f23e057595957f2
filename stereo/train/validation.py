"""Validation during training: the held-out samples evaluated with the EMA weights, scalars and panels logged."""

from __future__ import annotations

import contextlib
import math
import sys

import torch
import torch.distributed as dist

from stereo.config import Config
from stereo.data.demo import MOTORCYCLE

VAL_PANELS = 2  # validation images logged (the first held-out samples' labelled panels)
# validation samples whose EPE is also logged (val/epe/<key>) and printed on its own: the demo's one real pair
REAL_PAIRS = {MOTORCYCLE: "the real Middlebury pair"}


class Validator:
    """E's evaluate() on the held-out samples with the EMA weights: on rank 0 while the others wait at a barrier;
    under ZeRO-3 on every rank (its forward gathers the partitioned weights collectively), logged by rank 0."""

    def __init__(self, cfg: Config, module: torch.nn.Module, ema, env, log):
        self.cfg, self.module, self.ema, self.env, self.log = cfg, module, ema, env, log
        self.epe: dict[str, dict[str, float]] = {}  # label -> pooled EPE and each real pair's

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
            # eager: held-out images come in many sizes, and the compiled regions are the training step's
            with (self.ema.applied() if self.ema is not None else contextlib.nullcontext()), torch.no_grad(), \
                    torch.compiler.set_stance("force_eager"):
                metrics = evaluate(self.module, iter_val_samples(self.cfg.data), self.cfg.model.valid_iters,
                                   self.env.device, max_disp=self.cfg.model.max_disp, title=f"validation {step}",
                                   progress=self.env.rank == 0, total=count_val_samples(self.cfg.data),
                                   keep_panels=VAL_PANELS)
            self.module.train(was_training)
            scalars = {f"val/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            real = {row["key"]: row["epe"] for row in metrics["rows"]
                    if row["key"] in REAL_PAIRS and row["epe"] is not None}
            scalars |= {f"val/epe/{key}": epe for key, epe in real.items()}
            self.log.log(step, scalars)
            for index, (panel, row) in enumerate(zip(metrics["panels"], metrics["rows"])):
                epe = "no ground truth" if row["epe"] is None else f"EPE {row['epe']:.2f} px"
                self.log.log_image(step, f"val/disparity_{index}", panel, f"{row['key']}: {epe}")
            epe = scalars.get("val/epe/pooled", math.nan)
            if label:
                self.epe[label] = {"pooled": epe, **real}
            if self.env.rank == 0:
                print(f"validation at step {step}: EPE {epe:.3f} px pooled over {metrics['images']} images"
                      + "".join(f"; {key} {value:.3f} px" for key, value in real.items()), file=sys.stderr,
                      flush=True)
        if dist.is_initialized():
            dist.barrier()
        return scalars

    def print_summary(self) -> None:
        if self.env.rank == 0 and "before" in self.epe and "after" in self.epe:
            before, after = self.epe["before"], self.epe["after"]
            print(f"validation EPE before training {before['pooled']:.3f} -> after {after['pooled']:.3f} px "
                  f"(EMA weights, {self.cfg.data.val[0].name}, pooled over its images)", flush=True)
            for key in (k for k in after if k in REAL_PAIRS and k in before):
                print(f"  {key} ({REAL_PAIRS[key]}): {before[key]:.3f} -> {after[key]:.3f} px", flush=True)
