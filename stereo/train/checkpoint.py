"""Atomic, rotating checkpoints: DeepSpeed's own files plus our per-rank trainer state.

Layout under RUN_DIR/checkpoints/:
  step_NNNNNNNN.tmp/   being written by every rank (DeepSpeed files in ds/, trainer_state_rank{r}.pt)
  step_NNNNNNNN/       renamed by rank 0 after a barrier; complete only once COMPLETE exists (written last)
  latest               text: the newest complete directory name (a convenience; loading scans for COMPLETE)
A directory without COMPLETE is never loaded and is removed by the next save, so a crash or kill -9 at any moment
leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
DS_TAG = "ds"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def trainer_state_path(step_dir: Path, rank: int) -> Path:
    return step_dir / f"trainer_state_rank{rank}.pt"


def complete_steps(root: Path) -> list[int]:
    """Steps with a committed checkpoint, oldest first."""
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / COMPLETE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The newest complete checkpoint of a run (or the one at `step`); a clear error when there is none."""
    root = Path(run_dir) / "checkpoints"
    steps = complete_steps(root)
    if not steps:
        raise FileNotFoundError(f"{root}: no complete checkpoint (a step_NNNNNNNN directory with {COMPLETE})")
    if step is None:
        return root / step_dir_name(steps[-1])
    if step not in steps:
        raise FileNotFoundError(f"{root}: no complete checkpoint at step {step} (have {steps})")
    return root / step_dir_name(step)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int, keep_every: int | None, rank: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last, self.keep_every, self.rank = keep_last, keep_every, rank

    def latest(self) -> Path | None:
        steps = complete_steps(self.root)
        return self.root / step_dir_name(steps[-1]) if steps else None

    def save(self, engine, step: int, trainer_state: dict) -> Path:
        """Collective: every rank calls it at the same step."""
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            self._remove_incomplete()
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        torch.save(trainer_state, trainer_state_path(tmp, self.rank))
        _barrier()  # every rank's files are on disk before the commit
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)  # an uncommitted leftover of an earlier attempt
            os.replace(tmp, final)
            _fsync_write(final / COMPLETE, f"{step}\n")
            _fsync_write(self.root / "latest", final.name + "\n")
            self._prune()
        _barrier()
        return final

    def load(self, engine, step_dir: Path) -> dict:
        """Restore DeepSpeed's state (weights, optimizer, loss scaler) and return this rank's trainer state."""
        if not (step_dir / COMPLETE).is_file():
            raise FileNotFoundError(f"{step_dir}: incomplete checkpoint (no {COMPLETE}); refusing to load it")
        state_file = trainer_state_path(step_dir, self.rank)
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file}: missing; was the run saved with a different number of processes?")
        path, _ = engine.load_checkpoint(str(step_dir), tag=DS_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{step_dir / DS_TAG}: DeepSpeed could not load this checkpoint")
        return torch.load(state_file, map_location="cpu", weights_only=False)

    def _remove_incomplete(self) -> None:
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith("step_") and entry.is_dir() and not (entry / COMPLETE).is_file():
                shutil.rmtree(entry, ignore_errors=True)

    def _prune(self) -> None:
        steps = complete_steps(self.root)
        keep = set(steps[-self.keep_last:])
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        for step in steps:
            if step not in keep:
                # un-commit first, so that a kill during the removal cannot leave a half-deleted "complete" one
                (self.root / step_dir_name(step) / COMPLETE).unlink()
                shutil.rmtree(self.root / step_dir_name(step))


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".writing")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
