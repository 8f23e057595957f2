"""Exit codes of `python -m stereo ...` (the table is in docs/training.md, "Exit codes").

The Slurm job (jobs/job.py) requeues on PREEMPTED only; every other non-zero code ends the job without a requeue,
because restarting cannot fix a bad config, bad data or a broken checkpoint.
"""

from __future__ import annotations

OK = 0
INTERNAL = 1  # a bug or an unexpected failure (the traceback is printed)
CONFIG = 2  # bad config key or value, bad override, missing shard/pretrained path, refused config change on resume
TOO_MANY_BAD_STEPS = 3  # train.max_bad_steps non-finite steps in a row
DATA = 4  # unusable training data: too many unreadable samples in a shard, no readable sample at all
CHECKPOINT = 5  # no loadable checkpoint to resume from, or a save failed (disk full, permission denied)
RUN_DIR_BUSY = 6  # another live trainer holds the run directory's lock
PREEMPTED = 75  # a stop signal (Slurm, Ctrl-C): checkpointed at the step in progress; restart to resume
INTERRUPTED = 130  # a second Ctrl-C: stopped at once without saving the step in progress (the shell's code)

MEANING = {
    OK: "done",
    INTERNAL: "internal error",
    CONFIG: "config error",
    TOO_MANY_BAD_STEPS: "too many non-finite steps",
    DATA: "data error",
    CHECKPOINT: "checkpoint error",
    RUN_DIR_BUSY: "run directory in use",
    PREEMPTED: "preempted (checkpointed; restart to resume)",
    INTERRUPTED: "interrupted",
}
