"""`make bench-restart [a.b=value ...]`: how long a preempted job takes to train again, and where the time goes.

Submits the tiny CPU config to the Slurm cluster that SLURM_CONF points at (`make slurm-up`), waits for its first
step, then for each cycle sends SIGUSR1 to the job (the path of every stop signal: save, requeue, restart) and waits
for the first step of the restart. Each part comes from its own clock: the checkpoint's COMPLETE file (saved),
Slurm's SubmitTime/EligibleTime/StartTime of the requeued job (whole seconds), the trainer's `startup/*_s` record
in metrics.jsonl (its start-up phases; the wall time of its first step after the restart). Prints a table and
writes runs/bench-restart.json; docs/cluster.md ("Restart time") has the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from jobs.state import query, slurm_hint, slurm_problem
from jobs.submit import submit
from stereo.config import load_config

# Tiny and long enough for the cycles: no validation, no periodic checkpoint, a metrics record every step; the
# trainer gets 450 s (75 % of signal_delay_s) to save, however busy the machine.
DEFAULTS = ["train.steps=100000", "checkpoint.every=100000", "train.val_every=100000", "data.val=[]",
            "logging.every=1", "logging.image_every=100000", "logging.wandb=disabled", "slurm.cpus_per_task=2",
            "slurm.mem_gb=6", "slurm.time_min=60", "slurm.signal_delay_s=600"]
TIMEOUT_S = 600.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_restart", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides of the tiny config")
    parser.add_argument("--cycles", type=int, default=2, help="stop-and-restart cycles to time (default 2)")
    parser.add_argument("--out", default="runs/bench-restart.json")
    args = parser.parse_args(argv)
    problem = slurm_problem()
    if problem:
        print(f"bench-restart: cannot reach Slurm ({problem}); {slurm_hint()}", file=sys.stderr)
        return 1
    run_dir = Path("runs") / f"bench-restart-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [*DEFAULTS, f"train.run_dir={run_dir}", *args.overrides]
    submission = submit(load_config("tiny", overrides), config="tiny", overrides=overrides)
    print(f"job {submission.job_id}, run {submission.run_dir}, log {submission.log_path()}", file=sys.stderr)
    metrics = Path(submission.run_dir) / "metrics.jsonl"
    cycles = []
    try:
        wait(lambda: first_record_after(metrics, 0), "the first step")
        for cycle in range(1, args.cycles + 1):
            cycles.append(time_one_restart(submission.job_id, Path(submission.run_dir), cycle))
            print(f"cycle {cycle}: {cycles[-1]['total_s']:.1f} s from the signal to the first resumed step",
                  file=sys.stderr)
    finally:  # the run is only a means: cancel it and remove its files once Slurm has ended it
        subprocess.run(["scancel", submission.job_id], capture_output=True)
        wait(lambda: query(submission.job_id).state != "RUNNING" or None, "the cancelled job to end")
        for path in (Path(submission.run_dir), Path(submission.folder)):
            shutil.rmtree(path, ignore_errors=True)
    report = {"job_id": submission.job_id, "run_dir": submission.run_dir, "overrides": overrides, "cycles": cycles}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(cycles)
    print(f"written: {args.out}")
    return 0


def time_one_restart(job_id: str, run_dir: Path, cycle: int) -> dict:
    """Signal the running job and time each part of the way to its next training step."""
    metrics = run_dir / "metrics.jsonl"
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    checkpoint = wait(lambda: newest_complete(run_dir, signalled), f"the checkpoint of stop {cycle}")
    saved, saved_step = checkpoint.stat().st_mtime, int(checkpoint.parent.name.removeprefix("step_"))
    resumed = wait(lambda: first_record_after(metrics, saved_step), f"the first step of restart {cycle}")
    times = slurm_times(job_id)
    startup = {key.removeprefix("startup/").removesuffix("_s"): value for key, value in resumed.items()
               if key.startswith("startup/") and key != "startup/total_s"}
    parts = {
        "finish the step and save": saved - signalled,
        "trainer exit, requeue (wrapper, srun, batch shell)": seconds_until(times["SubmitTime"], saved),
        "requeue hold (cred_expire + 1 s)": times["EligibleTime"] - times["SubmitTime"],
        "scheduling": times["StartTime"] - times["EligibleTime"],
    }
    trainer_start = resumed["time"] - resumed["startup/total_s"] if startup else None
    if trainer_start is not None:
        parts["batch script, srun, job wrapper"] = trainer_start - times["StartTime"]
        parts.update({f"trainer: {phase.replace('_', ' ')}": seconds for phase, seconds in startup.items()})
    else:  # a trainer without the start-up record
        parts["job start to first step (wrapper and trainer)"] = resumed["time"] - times["StartTime"]
    return {"cycle": cycle, "total_s": resumed["time"] - signalled, "resumed_step": resumed["step"],
            "parts_s": {name: round(seconds, 2) for name, seconds in parts.items()}}


def seconds_until(slurm_time: float, since: float) -> float:
    """Seconds from `since` (our clock) to an event Slurm stamps in whole seconds: it happened within
    [slurm_time, slurm_time + 1) and not before `since`; the middle of what remains of that second (a requeue
    within the second of the save printed as a negative time)."""
    low = max(slurm_time, since)
    return (low + max(slurm_time + 1.0, low)) / 2 - since


def first_record_after(metrics: Path, step: int) -> dict | None:
    """The metrics of the first step after `step` (the first step of the start that resumed from it), its
    records merged: the start-up breakdown is a record of its own."""
    if not metrics.is_file():
        return None
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    later = [r for r in records if r.get("step", 0) > step and "time" in r]
    if not later:
        return None
    first = min(r["step"] for r in later)
    return {k: v for r in later if r["step"] == first for k, v in r.items()}


def newest_complete(run_dir: Path, after: float) -> Path | None:
    """The COMPLETE marker of a checkpoint committed after `after` (unix time)."""
    marks = [p for p in (run_dir / "checkpoints").glob("step_*/COMPLETE") if p.stat().st_mtime > after]
    return max(marks, key=lambda p: p.stat().st_mtime) if marks else None


def slurm_times(job_id: str) -> dict[str, float]:
    """SubmitTime (the requeue), EligibleTime and StartTime of the job's current start, as unix times."""
    text = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                          check=True).stdout
    fields = dict(item.split("=", 1) for item in text.split() if "=" in item)
    return {key: datetime.fromisoformat(fields[key]).timestamp() for key in ("SubmitTime", "EligibleTime",
                                                                              "StartTime")}


def wait(probe, what: str):
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"bench-restart: no {what} within {TIMEOUT_S:.0f} s")


def print_table(cycles: list[dict]) -> None:
    names = list(dict.fromkeys(name for cycle in cycles for name in cycle["parts_s"]))
    width = max(map(len, names + ["signal to first resumed step"]))
    print(f"{'seconds':<{width}}  " + "  ".join(f"cycle {c['cycle']:>2}" for c in cycles))
    for name in names:
        print(f"{name:<{width}}  " + "  ".join(f"{c['parts_s'].get(name, float('nan')):8.1f}" for c in cycles))
    print(f"{'signal to first resumed step':<{width}}  " + "  ".join(f"{c['total_s']:8.1f}" for c in cycles))


if __name__ == "__main__":
    sys.exit(main())
