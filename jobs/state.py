"""A Slurm job's state as the controller reports it (`status`, `logs`, `cancel`), and whether Slurm answers at all.

`scontrol show job` knows pending, running and (for MinJobAge) finished jobs; sacct, where accounting exists, knows
older ones. When neither answers, the state is unknown, never final: an unreachable controller (SLURM_CONF unset,
a timeout) says nothing about the job, which may well be running.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED"}
QUERY_TIMEOUT_S = 30.0


@dataclass
class JobState:
    state: str | None  # Slurm's JobState (PENDING, RUNNING, COMPLETED, ...); None: unknown
    reason: str = ""  # Slurm's Reason (why it is pending, or how it ended); "" for None
    restarts: int = 0
    problem: str = ""  # why the state is unknown
    reachable: bool = True  # False: the controller could not be asked at all (rather than not knowing the job)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def describe(self) -> str:
        if self.state is None:
            return f"unknown: {self.problem}"
        reason = f" ({self.reason})" if self.reason and self.reason != "None" else ""
        restarts = f", restarted {self.restarts} time(s)" if self.restarts else ""
        return f"{self.state}{reason}{restarts}"


def query(job_id: str) -> JobState:
    problem = slurm_problem()  # quick; asking a dead controller about a job takes scontrol ~20 s of retries
    if problem:
        return JobState(None, problem=f"cannot reach Slurm: {problem}", reachable=False)
    done = _run(["scontrol", "-o", "show", "job", job_id])
    if isinstance(done, str):
        return JobState(None, problem=f"cannot reach Slurm: {done}", reachable=False)
    if done.returncode == 0:
        fields = dict(item.split("=", 1) for item in done.stdout.split() if "=" in item)
        if "JobState" in fields:
            return JobState(fields["JobState"], fields.get("Reason", ""), int(fields.get("Restarts", 0) or 0))
    message = (done.stderr or done.stdout).strip()
    if "Invalid job id" not in message:
        return JobState(None, problem=f"cannot reach Slurm: {_last_line(message) or 'scontrol failed'}",
                        reachable=False)
    accounted = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"])
    if not isinstance(accounted, str) and accounted.returncode == 0 and accounted.stdout.strip():
        return JobState(accounted.stdout.split()[0])
    return JobState(None, problem="the controller no longer knows this job (it ended more than MinJobAge ago, "
                                  "and there is no accounting), or it belongs to another cluster")


def slurm_problem() -> str | None:
    """Why Slurm cannot be used from here (not installed, no configuration, controller down), or None."""
    done = _run(["scontrol", "ping"])
    if isinstance(done, str):
        return done
    if "DOWN" in done.stdout:
        return f"{done.stdout.strip().splitlines()[0]} (SLURM_CONF={os.environ.get('SLURM_CONF', 'unset')})"
    if done.returncode != 0:
        return _last_line(done.stderr + "\n" + done.stdout) or "scontrol ping failed"
    return None



def _run(command: list[str]) -> subprocess.CompletedProcess | str:
    """The finished command, or why it could not run."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except FileNotFoundError:
        return f"{command[0]} is not installed here (no Slurm client on PATH)"
    except subprocess.TimeoutExpired:
        return f"`{' '.join(command)}` did not answer within {QUERY_TIMEOUT_S:.0f} s"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def slurm_hint() -> str:
    """How to point the Slurm clients at a cluster: the local test cluster's SLURM_CONF, or a login node."""
    conf = Path(os.environ.get("STEREO_SLURM_DIR", "/tmp/stereo-slurm")) / "slurm.conf"
    return (f"for the local test cluster run `make slurm-up` and `export SLURM_CONF={shlex.quote(str(conf))}`; on a "
            "real cluster, run this on a login node (where `sinfo` works)")

