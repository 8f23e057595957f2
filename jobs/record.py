"""What `submit` remembers about a run: RUN_DIR/slurm_job.json, plus runs/last_submit pointing at the newest one."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

RECORD_NAME = "slurm_job.json"
LAST_SUBMIT = Path("runs/last_submit")


@dataclass
class Submission:
    job_id: str
    run_dir: str  # absolute
    folder: str  # submitit's folder for this run: job script, pickles, logs
    wandb_id: str
    wandb_name: str
    config: str
    overrides: list[str]
    submitted_at: str

    def save(self) -> None:
        path = Path(self.run_dir) / RECORD_NAME
        partial = path.with_name(f".{RECORD_NAME}.partial")  # atomic: a reader sees the old record or the new
        partial.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(partial, path)
        LAST_SUBMIT.parent.mkdir(parents=True, exist_ok=True)
        LAST_SUBMIT.write_text(self.run_dir + "\n")

    @classmethod
    def load(cls, run: str | None = None) -> "Submission":
        """The run directory given (or the one in runs/last_submit) -> its submission record."""
        if run is None:
            if not LAST_SUBMIT.is_file():
                raise FileNotFoundError(f"{LAST_SUBMIT}: no submission yet (give RUN=<run directory>)")
            run = LAST_SUBMIT.read_text().strip()
        path = Path(run) / RECORD_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a submitted run (expected the {RECORD_NAME} written by submit)")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except ValueError as exc:  # cut short, not JSON, not UTF-8
            raise ValueError(f"{path}: damaged submission record ({type(exc).__name__}: {exc})") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"{path}: expected a JSON object with keys {sorted(names)}, got {str(data)[:200]}")
        return cls(**data)

    def log_path(self, task: int = 0) -> Path:
        """submitit's log of one task (stderr goes to the same file); a requeued job appends to it."""
        return Path(self.folder) / f"{self.job_id}_{task}_log.out"

    def result_path(self) -> Path:
        return Path(self.folder) / f"{self.job_id}_0_result.pkl"
