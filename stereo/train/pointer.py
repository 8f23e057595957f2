"""RUN_DIR/checkpoints/latest, read without torch (the Slurm job wrapper and `make status` read it too).

`latest` is a convenience written after each commit: loading scans for COMPLETE markers instead. Whatever a crash
or a stray write leaves in it (nothing, half a name, bytes that are not UTF-8), a reader falls back as for a missing
pointer, and the trainer's next tidy rewrites it.
"""

from __future__ import annotations

import re
from pathlib import Path

LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def read_latest(checkpoints: Path) -> str | None:
    """The step directory name that `latest` holds; None when it is missing, unreadable or holds anything else."""
    try:
        name = (Path(checkpoints) / LATEST).read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if STEP_DIR.match(name) else None
