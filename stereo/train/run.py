"""The loop's helpers: run directory, trainer state, batches, the logging window, validation, the NaN test hook."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import subprocess
from collections import Counter
from collections.abc import Iterator
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from stereo.config import Config, dump_yaml
from stereo.train.checkpoint import CONFIG_FILE, CheckpointManager, complete_steps, step_dir_name
from stereo.train.failures import ExitContext, agree_on_failure
from stereo.train.rundir import RunDirLock, check_resume_config, record_start

REPO_ROOT = Path(__file__).resolve().parents[2]
VAL_PANELS = 2  # validation images logged (the first held-out samples' labelled panels)


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


@dataclass
class RunInfo:
    path: Path
    git_revision: str | None
    start: int  # 1 for the run's first start, +1 for every restart (requeue, resume)
    changes: list[tuple[str, object, object]]  # config keys changed since the checkpoint being resumed


def open_run_dir(cfg: Config, context: ExitContext) -> RunInfo:
    """train.run_dir or runs/<name>-<UTC time> (rank 0 picks the time); rank 0 locks it, tidies the checkpoints,
    checks the config against the one being resumed and records this start; a failure there stops every rank."""
    chosen = [cfg.train.run_dir or f"runs/{cfg.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}", git_revision()]
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    path, revision = Path(chosen[0]), chosen[1]

    def prepare() -> tuple[int, list]:
        print(f"run directory: {path.resolve()}", flush=True)
        lock = RunDirLock(path).acquire()
        context.cleanups.append(lambda _code: lock.release())
        context.run_dir = path
        CheckpointManager(path, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every, 0).tidy()
        stored, where = stored_config(path)
        changes = check_resume_config(stored, cfg, where)
        return record_start(path, cfg), changes

    start, changes = agree_on_failure(context, prepare)
    context.run_dir = path
    return RunInfo(path, revision, start, changes)


def stored_config(run_dir: Path) -> tuple[str | None, Path | None]:
    """The resolved config the newest complete checkpoint trained with (None without a checkpoint)."""
    steps = complete_steps(run_dir / "checkpoints")
    if not steps:
        return None, None
    step_dir = run_dir / "checkpoints" / step_dir_name(steps[-1])
    for candidate in (step_dir / CONFIG_FILE, run_dir / "config.yaml"):  # the second: checkpoints of older versions
        if candidate.is_file():
            return candidate.read_text(), candidate
    return None, None


def process_age_s() -> float:
    """Seconds since this process started (the interpreter's start-up and the imports before train())."""
    import psutil

    return time.time() - psutil.Process().create_time()


class StartupClock:
    """Seconds spent in each phase of a start, logged once the first step is done (requeues pay all of it)."""

    def __init__(self) -> None:
        self.seconds = {"imports": process_age_s()}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self._last
        self._last = now

    def summary(self, run: RunInfo, resumed: tuple[Path, dict] | None, epochs: dict[str, int]) -> str:
        where = f"resumed at step {resumed[1]['step']} from {resumed[0]}" if resumed else "a fresh start"
        data = ", ".join(f"{name} epoch {epoch}" for name, epoch in epochs.items())
        parts = ", ".join(f"{phase.replace('_', ' ')} {s:.1f}" for phase, s in self.seconds.items())
        return (f"start {run.start} of run {run.path}: {where}, data at {data}; "
                f"start-up {sum(self.seconds.values()):.1f} s ({parts})")


@dataclass
class RunState:
    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    bad_streak: int = 0
    skipped_at: list[int] = field(default_factory=list)

    def count_bad_step(self, rank: int, why: str) -> None:
        self.skipped_steps += 1
        self.bad_streak += 1
        self.skipped_at.append(self.step + 1)  # numbered like the log: the step being computed
        print(f"[rank {rank}] skipped step {self.step + 1}: {why} (skipped so far: {self.skipped_steps})",
              file=sys.stderr, flush=True)

    def trainer_state(self, loader, ema, rng: dict, engine, cfg: Config, revision: str | None) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "skipped_steps": self.skipped_steps,
                "bad_streak": self.bad_streak, "skipped_at": list(self.skipped_at),
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "loader": loader.state_dict(), "rng": rng, "ema": ema.state_dict() if ema is not None else None,
                "loss_scale": float(getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", 1.0))
                                    or 1.0),
                "config": dump_yaml(cfg), "git_revision": revision}

    @classmethod
    def restore(cls, saved: dict, world_size: int, where: Path) -> "RunState":
        if saved["world_size"] != world_size:
            raise RuntimeError(f"{where}: saved by {saved['world_size']} processes, resuming with {world_size}; "
                               "the data-loader and RNG states are per rank, so use the same process count")
        return cls(saved["step"], saved["samples_seen"], saved["skipped_steps"], saved["bad_streak"],
                   list(saved["skipped_at"]))


def batches_forever(loader, device: torch.device):
    """Endless stream of batches on the device (a finite loader is simply restarted).

    Tensors are made contiguous: collate's images come NHWC-strided from numpy, and on CPU (torch 2.13, oneDNN)
    the backward of a strided-2 1x1 conv on such input corrupts the heap ("double free or corruption").
    """
    while True:
        for batch in loader:
            yield {k: v.to(device, non_blocking=True).contiguous() if torch.is_tensor(v) else v
                   for k, v in batch.items()}


def started(batches: Iterator[dict]) -> Iterator[dict]:
    """The same stream, with its first batch already fetched (so that the loader has started)."""
    first = next(batches)
    return itertools.chain([first], batches)


def nan_injection_steps(rank: int) -> Counter:
    """Test hook: STEREO_TEST_NAN_STEPS=3,5,5 poisons the loss of one attempt at step 3 and of two at step 5
    (a dropped micro-batch is retried at the same step), on rank STEREO_TEST_NAN_RANK (default: every rank)."""
    steps = os.environ.get("STEREO_TEST_NAN_STEPS", "")
    only_rank = os.environ.get("STEREO_TEST_NAN_RANK")
    if not steps or (only_rank is not None and int(only_rank) != rank):
        return Counter()
    return Counter(int(s) for s in steps.split(","))


class Window:
    """Sums of the loss terms between two log lines, kept on the device: one host sync per logged line."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_batches = 0
        self.samples = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], samples: int) -> None:
        for key, value in terms.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.micro_batches += 1
        self.samples += samples

    def flush(self, lr: float, grad_norm, skipped_steps: int, loader) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        n = max(self.micro_batches, 1)
        means = {k: v.item() / n for k, v in self.sums.items()}
        scalars = {"loss": means.get("total", math.nan), "loss/init": means.get("init", math.nan),
                   "loss/seq": means.get("seq", math.nan), "train/epe": means.get("epe", math.nan),
                   "lr": lr, "grad_norm": grad_norm,
                   "samples_per_s": self.samples / max(elapsed, 1e-9), "data_wait_s": self.data_wait,
                   "skipped_steps": skipped_steps}
        if torch.cuda.is_available():
            scalars["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        for name, count in (loader.bad_sample_counts() or {}).items():
            scalars[f"bad_samples/{name}"] = count
        scalars["data/retries"] = loader.retries()
        self.__init__()
        return scalars


def training_panel(batch: dict, pred: torch.Tensor) -> np.ndarray:
    """left | gt | prediction | error for the batch's first sample."""
    from stereo.eval.report import disparity_panel

    def first(t: torch.Tensor) -> np.ndarray:
        return t[0].detach().float().cpu().numpy()

    return disparity_panel(first(batch["left"]), first(batch["disp"]), first(pred), first(batch["valid"]))


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

