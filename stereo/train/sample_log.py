"""RUN_DIR/samples/rank{r}.jsonl (logging.sample_keys): the "data set/key" of every sample a rank trained on, one
line per optimizer step, `{"step": s, "keys": [...]}` in micro-batch order. The union over the ranks' files at a step
is that step's global batch, so two runs can be compared sample for sample whatever their world sizes."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

SAMPLES_DIR = "samples"


class SampleLog:
    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.dir, self.rank, self.enabled = Path(run_dir) / SAMPLES_DIR, rank, enabled
        self.keys: list[str] = []

    def truncate_after(self, step: int) -> None:
        """Collective. Rank 0 drops the lines after the step being resumed from, in every rank's file (an earlier
        start may have had more ranks than this one)."""
        if not self.enabled:
            return
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for path in self.dir.glob("rank*.jsonl"):
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in kept))
        if dist.is_initialized():
            dist.barrier()

    def add(self, keys: list[str]) -> None:
        if self.enabled:
            self.keys.extend(keys)

    def step_done(self, step: int) -> None:
        if not self.enabled:
            return
        with open(self.dir / f"rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "keys": self.keys}) + "\n")
        self.keys = []


def read_sample_log(run_dir: Path) -> dict[int, list[str]]:
    """step -> the sorted keys of that step's global batch, over every rank's file."""
    steps: dict[int, list[str]] = {}
    for path in sorted((Path(run_dir) / SAMPLES_DIR).glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                steps.setdefault(record["step"], []).extend(record["keys"])
    return {step: sorted(keys) for step, keys in sorted(steps.items())}
