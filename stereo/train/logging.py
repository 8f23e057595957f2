"""Run logging: RUN_DIR/metrics.jsonl (always) and wandb (offline unless an API key is configured).

One wandb run per training: its id lives in RUN_DIR/wandb_id and is reused with resume="allow" on every restart.
Only rank 0 logs. The API key is read by wandb from the environment and never written by us anywhere.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import numpy as np

from stereo.config import Config, to_dict


def wandb_mode(setting: str) -> str:
    if setting == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return setting


class RunLogger:
    def __init__(self, run_dir: Path, cfg: Config, overrides: list[str], git_revision: str | None, rank: int):
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.wandb_run = None
        if self.enabled and wandb_mode(cfg.logging.wandb) != "disabled":
            self.wandb_run = self._start_wandb(cfg, overrides, git_revision)

    def _start_wandb(self, cfg: Config, overrides: list[str], git_revision: str | None):
        import wandb

        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        tags = list(cfg.logging.tags) + [f"config:{cfg.name}"] + ([f"git:{git_revision[:10]}"] if git_revision else [])
        return wandb.init(
            project=cfg.logging.project, entity=cfg.logging.entity, group=cfg.logging.group or cfg.name,
            name=" ".join([cfg.name, *overrides]) or cfg.name, tags=tags, config=to_dict(cfg), id=run_id,
            resume="allow", dir=str(self.run_dir), mode=wandb_mode(cfg.logging.wandb),
            notes=f"git {git_revision}" if git_revision else None)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint we restart from (they will be logged again)."""
        if not self.enabled or not self.metrics_path.is_file():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **scalars}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._to_wandb(lambda run: run.log(scalars, step=step))

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
            print(f"wandb unavailable ({type(exc).__name__}: {exc}); logging to metrics.jsonl only", flush=True)
            self.wandb_run = None

    def finish(self) -> None:
        self._to_wandb(lambda run: run.finish())
        self.wandb_run = None
