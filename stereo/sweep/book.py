"""A sweep's directory, `runs/sweeps/<name>/`, and what it remembers about each trial.

    sweep.yaml      the sweep as started (the file, with any command-line overrides merged in)
    trials.jsonl    one line per trial: id, its varied overrides, run directory, state, Slurm job id, a note
    t00/, t01/ ...  the trials' run directories (ordinary runs; `trial_config.yaml` is what every start trains)
    rungs/          early stopping's ledger: each trial's metric at each rung (stereo/train/early_stop.py)
    slurm/          submitit's job scripts, pickles and logs (Slurm only)
    compare/        `make compare SWEEP=...`

Only one `sweep` command works on a sweep at a time (a lock on the directory), so nothing is submitted twice.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from stereo.progress import make_command
from stereo.sweep.spec import SWEEPS_ROOT

SWEEP_FILE = "sweep.yaml"
TRIALS_FILE = "trials.jsonl"
TRIAL_CONFIG = "trial_config.yaml"  # the fully resolved config every (re)start of a trial trains with
LOCK_FILE = ".lock"

COMPLETED = "completed"
PENDING = "pending"  # validated and written, not submitted yet


class SweepBusy(RuntimeError):
    """Another `sweep` command holds the sweep's lock."""


@dataclass
class TrialRecord:
    trial: str
    overrides: list[str]
    run_dir: str
    state: str = PENDING  # pending, Slurm's state in lower case (queued, running, completed, failed, cancelled,
    #                       ...), or with --local: running, completed, failed, interrupted
    job_id: str | None = None  # the Slurm job (array task) of the latest submission; None with --local
    note: str = ""  # how it ended, when not completed


@dataclass
class Progress:
    step: int | None  # the last logged step
    best: float | None  # best value of the metric after step 0 (every trial shares the starting weights' value)
    best_step: int | None
    stopped_at: int | None = None  # the rung where early stopping ended the trial


def shown_state(record: TrialRecord, progress: Progress) -> str:
    """The trial's state for people: a completed trial that early stopping ended says where."""
    state = record.state
    if state == COMPLETED and progress.stopped_at is not None:
        state = f"stopped early at step {progress.stopped_at}"
    return state + (f" ({record.note})" if record.note else "")


class SweepDir:
    def __init__(self, name: str, root: Path = SWEEPS_ROOT):
        self.path = Path(root) / name
        self.spec_file = self.path / SWEEP_FILE
        self.trials_file = self.path / TRIALS_FILE

    def exists(self) -> bool:
        return self.spec_file.is_file()

    def write_spec(self, raw: dict[str, Any], origin: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        header = (f"# The sweep as started from {origin}.\n"
                  f"# `{make_command('sweep', SWEEP=self.path)}` resumes it; `make sweep-status` / `make compare` "
                  "read it.\n")
        _write_atomic(self.spec_file, header + yaml.safe_dump(raw, sort_keys=False))

    def read(self) -> list[TrialRecord]:
        if not self.trials_file.is_file():
            return []
        names = {f.name for f in fields(TrialRecord)}
        records = []
        for number, line in enumerate(self.trials_file.read_text().splitlines(), 1):
            data = json.loads(line) if line.strip() else None
            if not isinstance(data, dict) or set(data) != names:
                raise ValueError(f"{self.trials_file}:{number}: expected a JSON object with keys {sorted(names)}")
            records.append(TrialRecord(**data))
        return records

    def write(self, records: list[TrialRecord]) -> None:
        _write_atomic(self.trials_file, "".join(json.dumps(asdict(r)) + "\n" for r in records))

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Held while a `sweep` command submits or runs trials; a second one is refused, not queued behind."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SweepBusy(f"{self.path}: another `sweep` command is working on this sweep (its lock "
                                f"{self.path / LOCK_FILE} is held); wait for it, or see `make sweep-status`") from None
            yield


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def trial_progress(run_dir: str | Path, metric: str, direction: str) -> Progress:
    """Step and metric so far from the run's metrics.jsonl (a line being written right now is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    step, values, stopped_at = None, [], None
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                step = max(step or 0, record["step"])
                if record.get("event") == "stopped_early":
                    stopped_at = record["step"]
                value = record.get(metric)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    values.append((record["step"], float(value)))
    later = [(s, v) for s, v in values if s > 0]
    if not later:
        return Progress(step, None, None, stopped_at)
    pick = min if direction == "min" else max
    best_step, best = pick(later, key=lambda sv: sv[1])
    return Progress(step, best, best_step, stopped_at)

