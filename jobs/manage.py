"""`python -m stereo status|logs|cancel [RUN]`: the Slurm side of a submitted run (default: the last submitted).

stereo/cli.py sets `args.action` to the command name. State comes from squeue, then `scontrol show job` (finished
jobs stay there for MinJobAge), then sacct where accounting exists; how the job ended comes from submitit's result.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

from jobs.record import Submission

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED", "UNKNOWN"}


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
    state, restarts = job_state(submission.job_id)
    latest = Path(submission.run_dir) / "checkpoints" / "latest"
    print(f"job:        {submission.job_id} ({submission.config} {' '.join(submission.overrides)})".rstrip())
    print(f"state:      {state}" + (f", restarted {restarts} time(s)" if restarts else ""))
    print(f"run:        {submission.run_dir}")
    print(f"checkpoint: {latest.read_text().strip() if latest.is_file() else 'none yet'}")
    print(f"wandb:      {submission.wandb_name} (id {submission.wandb_id})")
    print(f"log:        {submission.log_path()}")
    outcome = job_outcome(submission)
    if outcome:
        print(f"outcome:    {outcome}")
    return 0


def logs(submission: Submission, args) -> int:
    path = submission.log_path(args.task)
    if not path.is_file():
        print(f"logs: {path} does not exist yet (job {submission.job_id} has not started?)", file=sys.stderr)
        return 1
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    sys.stdout.write("".join(lines[-args.lines:] if args.lines else lines))
    return 0


def cancel(submission: Submission, args) -> int:
    state, _ = job_state(submission.job_id)
    if state.split()[0] in FINAL_STATES:
        print(f"job {submission.job_id} already ended: {state}")
        return 0
    # scancel sends SIGTERM first: the trainer saves a checkpoint if KillWait leaves it the time.
    done = subprocess.run(["scancel", submission.job_id], capture_output=True, text=True)
    if done.returncode:
        print(f"cancel: scancel {submission.job_id} failed: {done.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"cancelled job {submission.job_id} ({submission.run_dir})")
    return 0


def job_state(job_id: str) -> tuple[str, int]:
    """(Slurm state, restart count) from the first source that still knows the job."""
    queued = _output(["squeue", "-h", "-j", job_id, "-o", "%T"])
    fields = dict(item.split("=", 1) for item in _output(["scontrol", "-o", "show", "job", job_id]).split()
                  if "=" in item)
    restarts = int(fields.get("Restarts", 0))
    if queued:
        return queued.splitlines()[0], restarts
    if "JobState" in fields:
        return fields["JobState"], restarts
    accounted = _output(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"])
    return (accounted.splitlines()[0] if accounted else "UNKNOWN (no longer known to Slurm)"), restarts


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


def _output(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""
