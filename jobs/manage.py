"""`python -m stereo status|logs|cancel [RUN]`: the Slurm side of a submitted run (default: the last submitted).

stereo/cli.py sets `args.action` to the command name. The state comes from jobs/state.py (scontrol, then sacct);
how the job ended comes from submitit's result file; the training progress from the run directory.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

from jobs.record import Submission
from jobs.state import query, slurm_hint
from stereo.train.run_files import read_latest


def add_arguments(parser) -> None:
    parser.add_argument("run", nargs="?", default=None, help="run directory (default: the one in runs/last_submit)")
    parser.add_argument("--lines", type=int, default=None, help="logs: only the last N lines")
    parser.add_argument("--task", type=int, default=0, help="logs: which Slurm task's log (default 0)")


def run(args) -> int:
    try:
        submission = Submission.load(args.run)
    except (FileNotFoundError, ValueError) as exc:
        print(f"{args.action}: {exc}", file=sys.stderr)
        return 1
    return {"status": status, "logs": logs, "cancel": cancel}[args.action](submission, args)


def status(submission: Submission, args) -> int:
    state = query(submission.job_id)
    print(f"job:        {submission.job_id} ({submission.config} {' '.join(submission.overrides)})".rstrip())
    print(f"state:      {state.describe()}")
    print(f"run:        {submission.run_dir}")
    print(f"checkpoint: {checkpoint_summary(Path(submission.run_dir))}")
    print(f"wandb:      {submission.wandb_name} (id {submission.wandb_id})")
    print(f"log:        {submission.log_path()}")
    outcome = job_outcome(submission)
    if outcome:
        print(f"outcome:    {outcome}")
    if not state.reachable:
        print(f"status: the job's state is unknown; {slurm_hint()}", file=sys.stderr)
        return 1
    return 0


def logs(submission: Submission, args) -> int:
    path = submission.log_path(args.task)
    if not path.is_file():
        state = query(submission.job_id)
        if state.state in ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED"):
            print(f"job {submission.job_id} has not written its log yet: {state.describe()}; the log will be {path}")
            return 0
        print(f"logs: {path} does not exist; job {submission.job_id}: {state.describe()}", file=sys.stderr)
        return 1
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    sys.stdout.write("".join(lines[-args.lines:] if args.lines else lines))
    return 0


def cancel(submission: Submission, args) -> int:
    state = query(submission.job_id)
    if not state.reachable:
        print(f"cancel: nothing cancelled, the job's state is unknown ({state.problem}); "
              f"{slurm_hint()}", file=sys.stderr)
        return 1
    if state.final:
        print(f"job {submission.job_id} already ended: {state.describe()}")
        return 0
    if state.state is None:
        outcome = job_outcome(submission)
        if outcome:
            print(f"job {submission.job_id} already ended: {outcome}")
            return 0
        print(f"cancel: nothing cancelled: job {submission.job_id}: {state.problem}", file=sys.stderr)
        return 1
    # scancel sends SIGTERM first: the trainer saves a checkpoint if KillWait leaves it the time.
    done = subprocess.run(["scancel", submission.job_id], capture_output=True, text=True)
    if done.returncode:
        print(f"cancel: scancel {submission.job_id} failed: {done.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"cancelled job {submission.job_id} ({submission.run_dir})")
    return 0


def checkpoint_summary(run_dir: Path) -> str:
    """The newest complete checkpoint and the last step logged in metrics.jsonl (with how long ago)."""
    name = read_latest(run_dir / "checkpoints")
    text = f"{name} (step {int(name.rsplit('_', 1)[1])})" if name else "none yet"
    logged = last_logged_step(run_dir / "metrics.jsonl")
    if logged is not None:
        step, at = logged
        text += f"; last logged step {step}, {time.time() - at:.0f} s ago"
    return text


def last_logged_step(metrics: Path, tail_bytes: int = 65536) -> tuple[int, float] | None:
    """(step, unix time) of the newest record in metrics.jsonl, reading only the end of the file."""
    if not metrics.is_file():
        return None
    with metrics.open("rb") as f:
        f.seek(max(0, f.seek(0, 2) - tail_bytes))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            record = json.loads(line)
            return int(record["step"]), float(record["time"])
        except (ValueError, KeyError, TypeError):
            continue  # a partial first line, or a record without a time
    return None


def job_outcome(submission: Submission) -> str | None:
    """How the job ended according to submitit's result file: done, or the reason it stopped."""
    path = submission.result_path()
    if not path.is_file():
        return None
    with path.open("rb") as f:
        kind, value = pickle.load(f)
    if kind == "success":
        return f"finished ({value})"
    reason = [line for line in str(value).strip().splitlines() if line.strip()]
    return f"stopped: {reason[-1] if reason else value}"
