"""What the trainer does after every optimizer step, in this order: log the metrics, log an image, validate (and
let early stopping judge the result), agree on the signals across ranks, save a checkpoint, stop or go on."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from stereo import exitcodes
from stereo.config import Config, dump_yaml
from stereo.progress import TrainProgress, resume_command
from stereo.train import engine as ds_engine
from stereo.train.checkpoint import CheckpointManager
from stereo.train.early_stop import EarlyStop
from stereo.train.elastic import Layout
from stereo.train.logging import RunLogger
from stereo.train.metrics_window import Window
from stereo.train.rng import rng_state
from stereo.train.run_state import RunState
from stereo.train.signals import TrainerSignals
from stereo.train.validation import Validator


def training_panel(batch: dict, pred: torch.Tensor) -> np.ndarray:
    """left | gt | prediction | error for the batch's first sample."""
    from stereo.pictures import disparity_panel

    def first(t: torch.Tensor) -> np.ndarray:
        return t[0].detach().float().cpu().numpy()

    return disparity_panel(first(batch["left"]), first(batch["disp"]), first(pred), first(batch["valid"]))


@dataclass
class StepEnd:
    cfg: Config
    rank: int
    git_revision: str | None
    state: RunState
    engine: object
    loader: object
    ema: object
    window: Window
    log: RunLogger
    progress: TrainProgress
    validator: Validator
    early_stop: EarlyStop
    signals: TrainerSignals
    ckpts: CheckpointManager

    def __call__(self, lr: float, batch: dict, pred: torch.Tensor) -> int | None:
        """The exit code when the run stops at this step, None when it goes on."""
        cfg, step = self.cfg, self.state.step
        if step % cfg.logging.every == 0 or step == cfg.train.steps:
            scalars = self.window.flush(lr, ds_engine.grad_norm(self.engine), self.state.skipped_steps, self.loader)
            self.log.log(step, scalars)
            self.progress.log(scalars, step)
        self.progress.update(1)
        if cfg.logging.image_every and step % cfg.logging.image_every == 0:
            self.log.log_image(step, "train/disparity", training_panel(batch, pred))
        rung = None
        if step % cfg.train.val_every == 0 and step < cfg.train.steps:
            rung = self.early_stop.at(step, self.validator.run(step))
        stopped_early = rung is not None and rung.stop
        agreed = self.signals.agree()  # a signal during backward, the update or validation is saved at this step
        if agreed.stop or agreed.checkpoint or stopped_early or step % cfg.checkpoint.every == 0 \
                or step == cfg.train.steps:
            self.save()
        if stopped_early:
            self.log.stopped_early(rung, cfg.early_stop.metric)
            return exitcodes.OK
        if agreed.stop:
            print(f"[rank {self.rank}] stopped by a signal: checkpointed at step {step}, exiting "
                  f"{exitcodes.PREEMPTED}; to resume: {resume_command(self.log.run_dir)}", file=sys.stderr, flush=True)
            return exitcodes.PREEMPTED
        return None

    def save(self) -> None:
        state = self.state.trainer_state(self.loader, self.ema, rng_state(), self.engine, self.cfg, self.git_revision)
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.ckpts.save(self.engine, self.state.step, state, dump_yaml(self.cfg), Layout.of(self.cfg, world_size))
        self.signals.checkpoint_done()
