"""Run logging: RUN_DIR/metrics.jsonl (always, strict JSON: null for a missing or non-finite value), mirrored to
the trackers the config asks for (wandb, MLflow: stereo.train.trackers).

Only rank 0 logs. API keys and server credentials are read by the trackers from the environment and never written
by us anywhere. A tracker is a mirror of metrics.jsonl: a failed start or a dead service is one warning and the
run goes on without it (`make mlflow-upload` sends metrics.jsonl to an MLflow server later).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stereo.config import Config
from stereo.train.trackers import MlflowTracker, WandbTracker, metrics_records, wandb_mode


def strict(value):
    """A JSON-safe scalar: NaN and infinities become null (strict JSON readers reject bare NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


class RunLogger:
    def __init__(self, run_dir: Path, cfg: Config, overrides: list[str], git_revision: str | None, rank: int):
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.trackers: list = []
        wanted = [(WandbTracker, wandb_mode(cfg.logging.wandb) != "disabled"), (MlflowTracker, cfg.logging.mlflow)]
        for tracker, on in wanted if self.enabled else []:
            if on:
                try:
                    self.trackers.append(tracker(self.run_dir, cfg, overrides, git_revision))
                except Exception as exc:  # noqa: BLE001 - no network, bad key, broken install: the run goes on
                    warn(f"{tracker.name} did not start ({first_line(exc)}); logging to {self.metrics_path} only")

    @property
    def wandb_run(self):
        return next((t.run for t in self.trackers if t.name == "wandb"), None)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint we restart from (they will be logged again); a start
        without a checkpoint passes -1 and drops everything an earlier, checkpoint-less start logged."""
        if not self.enabled or not self.metrics_path.is_file():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))
        # what an earlier start logged while a tracker was away reaches it now (those already there are skipped)
        records = metrics_records(self.run_dir)
        self._each(lambda t: t.catch_up(records))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = time.time()
        self._append({"step": step, "time": now, **scalars})
        self._each(lambda t: t.log(step, scalars, now))

    def _append(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({k: strict(v) for k, v in record.items()}, allow_nan=False) + "\n")

    def startup(self, step: int, summary: str, seconds: dict[str, float]) -> None:
        """One line per start in the log, and its breakdown in metrics.jsonl (`startup/<phase>_s`)."""
        if not self.enabled:
            return
        print(summary, file=sys.stderr, flush=True)
        self.log(step, {f"startup/{phase}_s": round(s, 3) for phase, s in seconds.items()}
                 | {"startup/total_s": round(sum(seconds.values()), 3)})

    def record_config_changes(self, step: int, changes: list[tuple[str, object, object]]) -> None:
        """Config keys changed since the resumed checkpoint: in the log and metrics.jsonl (not in wandb's charts)."""
        if not self.enabled or not changes:
            return
        listing = {key: {"was": old, "now": new} for key, old, new in changes}
        print("config changed since the checkpoint: " + "; ".join(f"{k}: {v['was']!r} -> {v['now']!r}"
                                                                  for k, v in listing.items()), file=sys.stderr,
              flush=True)
        self._append({"step": step, "time": time.time(), "event": "config_change", "changes": listing})

    def stopped_early(self, rung, metric: str) -> None:
        """Successive halving stopped the run at this rung (stereo/train/early_stop.py)."""
        if not self.enabled:
            return
        self._append({"step": rung.step, "time": time.time(), "event": "stopped_early", **dataclasses.asdict(rung)})
        print(f"stopped early at step {rung.step}: {rung.describe(metric)}; checkpointed", file=sys.stderr,
                  flush=True)

    def log_image(self, step: int, name: str, image: np.ndarray, note: str = "") -> None:
        """An (H, W, 3) uint8 picture under a caption (name, step, `note`): saved under RUN_DIR/images/ and sent to
        the trackers."""
        if not self.enabled:
            return
        from PIL import Image

        from stereo.pictures import with_caption

        path = self.run_dir / "images" / f"{name.replace('/', '_')}_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        caption = ", ".join([f"{name} at step {step}", *([note] if note else [])])
        Image.fromarray(with_caption(image, caption)).save(path)
        self._each(lambda t: t.log_image(step, name, path))

    def _each(self, send: Callable) -> None:
        """Trackers are mirrors: if one's service is gone (Slurm's SIGTERM reaches wandb's too, before our
        checkpoint; an MLflow server down), the run goes on without it, one warning; metrics.jsonl stays complete
        and the requeued job resumes the same tracker runs."""
        for tracker in list(self.trackers):
            try:
                send(tracker)
            except Exception as exc:  # noqa: BLE001 - any failure of a mirror must not cost the checkpoint
                warn(f"{tracker.name} unavailable ({first_line(exc)}); logging to {self.metrics_path} only")
                self.trackers.remove(tracker)

    def finish(self, exit_code: int = 0) -> None:
        self._each(lambda t: t.finish(exit_code))
        self.trackers = []
