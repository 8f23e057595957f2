"""Small files of a run that every start reads back, read here only, without torch (the Slurm job wrapper,
`submit` and `make status` read them too). Whatever a crash or a stray write leaves in one (nothing, half a value,
bytes that are not UTF-8), the reader falls back as for a missing file.

- checkpoints/latest: the newest complete checkpoint's name, a convenience written after each commit (loading scans
  for COMPLETE markers instead); the trainer's next tidy rewrites a damaged one.
- wandb_id: the wandb run every start of the run logs into (written by `submit` before the job starts, or by the
  first start); a damaged one is replaced, with a warning: the run continues in a new wandb run.
"""

from __future__ import annotations

import os
import re
import secrets
import string
import sys
from pathlib import Path

LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d{8})$")
WANDB_ID = "wandb_id"
_WANDB_ID = re.compile(r"^[a-z0-9]{1,64}$")


def read_latest(checkpoints: Path) -> str | None:
    """The step directory name that `latest` holds; None when it is missing, unreadable or holds anything else."""
    try:
        name = (Path(checkpoints) / LATEST).read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if STEP_DIR.match(name) else None


def wandb_run_id(run_dir: Path) -> str:
    """The run's wandb id from RUN_DIR/wandb_id; a new one (wandb's format: 8 of [a-z0-9]) when it is missing or
    damaged, written atomically."""
    path = Path(run_dir) / WANDB_ID
    try:
        text = path.read_bytes().decode("utf-8").strip()
    except FileNotFoundError:
        text = None
    except (OSError, UnicodeDecodeError) as exc:
        text = f"unreadable ({type(exc).__name__})"
    if text is not None and _WANDB_ID.match(text):
        return text
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if text is not None:
        print(f"warning: {path}: not a wandb run id ({text[:40]!r}); the run continues in the new wandb run {run_id}",
              file=sys.stderr, flush=True)
    tmp = path.with_name(f"{WANDB_ID}.{os.getpid()}")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id
