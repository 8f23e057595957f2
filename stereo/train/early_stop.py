"""Early stopping by asynchronous successive halving (the config's `early_stop`; a sweep sets it for its trials).

The runs that share a ledger directory compete at each rung step. At a rung a run records its validation metric in
LEDGER/<step>/<run>.json and continues only if it ranks within the best max(1, n // eta) of the n runs recorded at
that rung so far, itself included (the earlier of equal results ranks first; a non-finite result ranks last and
always stops). The first run to reach a rung continues: there is nothing to compare it with yet. No scheduler
process is needed, so trials queued as a job array with a concurrency limit stop themselves. The decision is
stored with the result: a restarted run that validates at the same rung again gets the same answer.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from stereo.config import ConfigError
from stereo.config.schema import EarlyStopConfig


@dataclass
class Rung:
    step: int
    value: float | None  # None: not finite
    rank: int  # 1 = best, among `of`
    of: int  # runs recorded at this rung when this one arrived, itself included
    keep: int  # how many of those continue
    stop: bool

    def describe(self, metric: str) -> str:
        value = "not finite" if self.value is None else f"{self.value:.4g}"
        return (f"{metric} {value} ranks {self.rank} of the {self.of} runs at step {self.step} so far "
                f"(the best {self.keep} continue)")


def decide(ledger: str | Path, run: str, step: int, value: float, eta: int, direction: str) -> Rung:
    """Record `run`'s result at the rung `step` and rank it among the results recorded there before it."""
    folder = Path(ledger) / f"{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one run at a time reads the rung and adds itself
        own = folder / f"{run}.json"
        recorded = _entry(own) if own.is_file() else None
        if recorded is not None:
            return Rung(**{k: v for k, v in recorded.items() if k in Rung.__dataclass_fields__})
        others = [e for e in map(_entry, folder.glob("*.json")) if e is not None and e["run"] != run]
        finite = math.isfinite(value)
        entry = {"run": run, "value": value if finite else None, "arrival": len(others)}
        sign = 1.0 if direction == "min" else -1.0

        def order(e: dict) -> tuple:
            return (e["value"] is None, sign * (e["value"] or 0.0), e["arrival"])

        ranked = sorted([*others, entry], key=order)
        rank, keep = ranked.index(entry) + 1, max(1, len(ranked) // eta)
        rung = Rung(step, entry["value"], rank, len(ranked), keep, stop=rank > keep or not finite)
        partial = own.with_name(f".{own.name}.partial")
        partial.write_text(json.dumps({**entry, **asdict(rung)}))
        os.replace(partial, own)
        return rung


def _entry(path: Path) -> dict | None:
    """One run's record at a rung; None, with a warning naming the file, when a crash or a stray write damaged it
    (a damaged entry of this run is decided again, another run's is left out of the ranking)."""
    try:
        entry = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        entry = None
    if isinstance(entry, dict) and {"run", "value", "arrival", *Rung.__dataclass_fields__} <= set(entry):
        return entry
    print(f"warning: {path}: damaged early-stopping record, left out", file=sys.stderr, flush=True)
    return None


class EarlyStop:
    """The run's side: at a rung step rank 0 records the validation result and decides; every rank gets the answer."""

    def __init__(self, cfg: EarlyStopConfig, run_dir: Path, rank: int):
        self.cfg, self.run, self.rank = cfg, Path(run_dir).name, rank

    def at(self, step: int, scalars: dict[str, float]) -> Rung | None:
        """None where no rung is (or early stopping is off); else this rung's decision. Every validation checks that
        it logs the metric, the one before training included: a wrong name stops the run before it trains."""
        if self.cfg.ledger is None:
            return None
        if self.rank == 0 and scalars and self.cfg.metric not in scalars:
            raise ConfigError("early_stop.metric", f"a metric validation logs ({', '.join(sorted(scalars))}), "
                                                   f"got {self.cfg.metric!r}")
        if step not in self.cfg.rungs:
            return None
        rung = None
        if self.rank == 0:
            rung = decide(self.cfg.ledger, self.run, step, scalars[self.cfg.metric], self.cfg.eta,
                          self.cfg.direction)
        if dist.is_initialized():
            box = [rung]
            dist.broadcast_object_list(box, src=0)
            rung = box[0]
        return rung
