"""Run logging: RUN_DIR/metrics.jsonl (always, strict JSON: null for a missing or non-finite value) and wandb.

One wandb run per training: its id lives in RUN_DIR/wandb_id and is reused with resume="allow" on every restart.
Only rank 0 logs. The API key is read by wandb from the environment and never written by us anywhere. wandb is a
mirror of metrics.jsonl: a failed start or a dead service is one warning and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from stereo.config import Config, to_dict
from stereo.train.run_files import wandb_run_id


def wandb_mode(setting: str) -> str:
    """WANDB_MODE set by the user wins; `auto` is online with an API key and offline without."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if setting == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return setting


def strict(value):
    """A JSON-safe scalar: NaN and infinities become null (strict JSON readers reject bare NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def within(timeout_s: float, key: str, start):
    """`start()`'s result, or TimeoutError after `timeout_s` (0: no limit). wandb's own init_timeout leaves out its
    service's start and its first requests: without a network it waited 14 s at 5. A start given up on goes on in
    the background and its run, if it ever comes, is closed there."""
    outcome: dict = {}
    given_up = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = start()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc
        if given_up.is_set() and outcome.get("value") is not None:
            with contextlib.suppress(Exception):
                outcome["value"].finish(quiet=True)

    thread = threading.Thread(target=run, daemon=True, name=f"within {key}")
    thread.start()
    thread.join(timeout_s or None)
    if thread.is_alive():
        given_up.set()
        raise TimeoutError(f"not started within {key}={timeout_s} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class RunLogger:
    def __init__(self, run_dir: Path, cfg: Config, overrides: list[str], git_revision: str | None, rank: int):
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.wandb_run = None
        if self.enabled and wandb_mode(cfg.logging.wandb) != "disabled":
            try:
                self.wandb_run = within(cfg.logging.wandb_init_timeout_s, "logging.wandb_init_timeout_s",
                                        lambda: self._start_wandb(cfg, overrides, git_revision))
            except Exception as exc:  # noqa: BLE001 - no network, bad key, broken install: the run goes on
                first_line = (str(exc).strip().splitlines() or [""])[0]
                warn(f"wandb did not start ({type(exc).__name__}: {first_line}); logging to {self.metrics_path} only")

    def _start_wandb(self, cfg: Config, overrides: list[str], git_revision: str | None):
        import wandb

        run_id = wandb_run_id(self.run_dir)
        tags = list(cfg.logging.tags) + [f"config:{cfg.name}"] + ([f"git:{git_revision[:10]}"] if git_revision else [])
        return wandb.init(
            project=cfg.logging.project, entity=cfg.logging.entity, group=cfg.logging.group or cfg.name,
            name=" ".join([cfg.name, *overrides]) or cfg.name, tags=tags, config=to_dict(cfg), id=run_id,
            resume="allow", dir=str(self.run_dir), mode=wandb_mode(cfg.logging.wandb),
            notes=f"git {git_revision}" if git_revision else None,
            settings=wandb.Settings(init_timeout=cfg.logging.wandb_init_timeout_s))

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint we restart from (they will be logged again); a start
        without a checkpoint passes -1 and drops everything an earlier, checkpoint-less start logged."""
        if not self.enabled or not self.metrics_path.is_file():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._append({"step": step, "time": time.time(), **scalars})
        self._to_wandb(lambda run: run.log(scalars, step=step))

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

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 picture: saved under RUN_DIR/images/ and sent to wandb."""
        if not self.enabled:
            return
        from PIL import Image

        path = self.run_dir / "images" / f"{name.replace('/', '_')}_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        if self.wandb_run is not None:
            import wandb

            self._to_wandb(lambda run: run.log({name: wandb.Image(str(path))}, step=step))

    def _to_wandb(self, send) -> None:
        """wandb is a mirror: if its service is gone (Slurm's SIGTERM reaches it too, before our checkpoint), the
        run goes on without it; metrics.jsonl stays complete and the requeued job resumes the same wandb run."""
        if self.wandb_run is None:
            return
        try:
            send(self.wandb_run)
        except Exception as exc:  # noqa: BLE001 - any failure of the mirror must not cost the checkpoint
            warn(f"wandb unavailable ({type(exc).__name__}: {exc}); logging to {self.metrics_path} only")
            self.wandb_run = None

    def finish(self, exit_code: int = 0) -> None:
        self._to_wandb(lambda run: run.finish(exit_code=exit_code))
        self.wandb_run = None
