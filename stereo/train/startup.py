"""A start of the trainer: the run directory it opens (locked, its config checked against the checkpoint being
resumed, the start recorded), the git revision it runs, and the clock of its start-up phases."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch.distributed as dist

from stereo.config import Config
from stereo.config.errors import ConfigError
from stereo.train.checkpoint import CONFIG_FILE, CheckpointManager, complete_steps, step_dir_name
from stereo.train.elastic import Layout, keep_global_batch, read_layout
from stereo.train.failures import ExitContext, agree_on_failure
from stereo.train.rundir import RunDirLock, check_resume_config, record_start

REPO_ROOT = Path(__file__).resolve().parents[2]


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
    keeps the checkpoint's global batch at this world size (may set train.grad_accum, on every rank), checks the
    config against the one being resumed and records this start; a failure there stops every rank."""
    chosen = [cfg.train.run_dir or f"runs/{cfg.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}", git_revision()]
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    path, revision = Path(chosen[0]), chosen[1]

    def prepare() -> tuple[int, list]:
        print(f"run directory: {path.resolve()}", flush=True)
        context.run_dir = path  # also for a refusal: the directory exists
        lock = RunDirLock(path).acquire()
        context.cleanups.append(lambda _code: lock.release())
        CheckpointManager(path, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every, 0).tidy()
        stored, where = stored_config(path)
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        saved = read_layout(where.parent) if where is not None else None
        unkept = None
        if saved is not None:
            try:
                note = keep_global_batch(saved, cfg, world_size)
                if note:
                    print(note, file=sys.stderr, flush=True)
            except ConfigError as exc:  # after the comparison, which names every other difference first
                unkept = exc
        same_batch = saved is not None and saved.global_batch == Layout.of(cfg, world_size).global_batch
        try:
            changes = check_resume_config(stored, cfg, where, same_global_batch=same_batch)
        except ConfigError as exc:
            if unkept is None:
                raise
            raise ConfigError(exc.key, f"{exc.expected}. And {unkept.key}: {unkept.expected}") from None
        if unkept is not None:
            raise unkept
        return record_start(path, cfg), changes, cfg.train.grad_accum

    start, changes, cfg.train.grad_accum = agree_on_failure(context, prepare)
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
