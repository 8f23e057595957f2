"""The trainer's counters (step, samples seen, skipped steps) and the per-rank state a checkpoint stores with them."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from stereo.config import Config, dump_yaml


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
            raise RuntimeError(f"{where}: saved by {saved['world_size']} processes, resuming with {world_size}; it "
                               "was written by an older version, without layout.json: resume it once with "
                               f"{saved['world_size']} processes, and its next checkpoint can move")
        return cls(saved["step"], saved["samples_seen"], saved["skipped_steps"], saved["bad_streak"],
                   list(saved["skipped_at"]))
