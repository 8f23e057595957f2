"""The submitit job: runs the trainer as a child process and turns every stop signal into a checkpoint and a requeue.

Contract with the trainer (stereo/exitcodes.py, docs/architecture.md): on SIGUSR1, SIGTERM or SIGINT it finishes
the step in progress on every rank, saves a checkpoint at that step and exits PREEMPTED (75); 0 is done; any other
code is a failure that a restart cannot fix (a bad config, bad data, a broken checkpoint), so it is not requeued.

Slurm delivers a job's signal to every process of its steps: this wrapper, the trainer and the trainer's children
(the batch shell passes on what only it receives, jobs/submit.py). The wrapper's handler (USR1, USR2, TERM, INT;
it replaces submitit's) notes the first stop signal; the main thread then sends the trainer SIGUSR1 once the
trainer handles it (one still starting up a few seconds later has no step to save: it is ended instead), waits up
to `save_timeout_s` for the save and the exit, and task 0 exits 75. The batch shell then requeues the job if Slurm
still runs it (a user's signal, the time-limit signal, preemption in its grace time); after `scancel` or an outside
`scontrol requeue` Slurm is already ending it. docs/cluster.md has the table of every signal and target.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from jobs.rendezvous import trainer_env
from stereo import exitcodes
from stereo.train.run_files import read_latest

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
TRAINER_STOP = signal.SIGUSR1  # what the wrapper sends the trainer, whichever stop signal arrived
STARTING_GRACE_S = 3.0  # a trainer without its stop handler this long after a stop signal is still starting


class JobStopped(RuntimeError):
    """The job ends without a requeue; the message says why (it lands in the job log and the result file)."""


def log(message: str) -> None:
    print(f"[jobs] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def _ignore_stop_signals() -> None:
    # Until the trainer installs its own handlers a stop signal must not kill it mid-import: the wrapper sees the
    # signal too and ends it cleanly. Ignored dispositions survive exec; the trainer's handlers replace them.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@dataclass
class TrainingJob:
    """One Slurm task: one trainer process, with the torch.distributed rendezvous taken from Slurm."""

    python_args: list[str]  # the trainer, run by this job's own python: [-m, stereo, train, RUN_DIR/submit_config.yaml]
    cwd: str
    run_dir: str
    max_requeues: int
    save_timeout_s: float  # how long the trainer may take to save and exit after a stop signal
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _exit_code: int | None = field(default=None, init=False, repr=False)
    _stop: signal.Signals | None = field(default=None, init=False, repr=False)

    def __getstate__(self) -> dict:
        # What submitit pickles: the running child and the signals belong to one start only.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _proc=None, _exit_code=None, _stop=None)

    def __call__(self) -> dict:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCONT, signal.SIG_DFL)  # Slurm sends it before SIGTERM; submitit logged each one
        one_line_logs()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        env = trainer_env(os.environ)
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        log(f"start {restarts + 1} of job {os.environ.get('SLURM_JOB_ID')} (at most {self.max_requeues} requeues): "
            f"task {rank} of {world} on {os.environ.get('SLURMD_NODENAME', os.uname().nodename)}, rendezvous "
            f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}; run {self.run_dir}, newest checkpoint {self._latest()}")
        if restarts > self.max_requeues:
            raise JobStopped(f"requeued {restarts} times, more than slurm.max_requeues={self.max_requeues}: "
                             "not training again")
        self._start(env)
        code = self._supervise()
        if code == exitcodes.OK:
            log("trainer finished")
            return {"run_dir": self.run_dir, "restarts": restarts}
        if self._stop is None and code != exitcodes.PREEMPTED:
            raise JobStopped(f"trainer {describe_exit(code)}: a failure, not requeued (only a stop signal requeues); "
                             "its output is above in this log")
        return self._after_stop(code, rank, restarts)

    def _on_signal(self, signum: int, _frame) -> None:
        # Runs in the main thread between two bytecodes: only note the signal, the main loop acts on it.
        if self._stop is None:
            self._stop = signal.Signals(signum)

    def _start(self, rendezvous: dict[str, str]) -> None:
        self._proc = subprocess.Popen([sys.executable, *self.python_args], cwd=self.cwd,
                                      env={**os.environ, **rendezvous}, preexec_fn=_ignore_stop_signals)
        # A thread owns the blocking wait, so the main loop can poll the exit code and the stop flag.
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        assert self._proc is not None
        self._exit_code = self._proc.wait()

    def _supervise(self) -> int:
        """Wait for the trainer's exit; after a stop signal, ask it to save (or end it) and bound the wait."""
        assert self._proc is not None
        stopped_at, asked, killed = None, False, False
        while self._exit_code is None:
            now = time.monotonic()
            if self._stop is not None:
                stopped_at = stopped_at or now
                if not asked and handles_signal(self._proc.pid, TRAINER_STOP):
                    log(f"{self._stop.name}: asking the trainer to save at the step in progress and exit "
                        f"(up to {self.save_timeout_s:.0f} s)")
                    self._proc.send_signal(TRAINER_STOP)
                    asked = True
                elif not asked and now - stopped_at > STARTING_GRACE_S:
                    log(f"{self._stop.name}: the trainer is still starting (no step to save): ending it")
                    self._proc.kill()
                    asked = killed = True
                elif not killed and now - stopped_at > self.save_timeout_s:
                    log(f"the trainer did not exit within {self.save_timeout_s:.0f} s of the stop signal: killing "
                        "it; the restart resumes from its newest complete checkpoint")
                    self._proc.kill()
                    killed = True
            time.sleep(0.1)
        return self._exit_code

    def _after_stop(self, code: int, rank: int, restarts: int) -> NoReturn:
        """The trainer stopped for a signal: exit so that the batch shell requeues the job."""
        how = "saved and exited" if code == exitcodes.PREEMPTED else describe_exit(code) + " while stopping"
        if rank != 0:
            # Exit 0: a non-zero code would make srun (--kill-on-bad-exit) kill task 0, maybe mid-save.
            log(f"the trainer {how}")
            raise SystemExit(exitcodes.OK)
        if restarts >= self.max_requeues:
            raise JobStopped(f"the trainer {how}, newest complete checkpoint {self._latest()}; not requeued: reached "
                             f"slurm.max_requeues={self.max_requeues} (SLURM_RESTART_COUNT={restarts}); submit again "
                             f"with {shlex.quote(f'train.run_dir={self.run_dir}')} to continue")
        log(f"the trainer {how}; newest complete checkpoint {self._latest()}")
        raise SystemExit(exitcodes.PREEMPTED)  # the batch shell requeues the job unless Slurm is ending it

    def _latest(self) -> str:
        return read_latest(Path(self.run_dir) / "checkpoints") or "none"


def one_line_logs() -> None:
    """One line per event in the job log: submitit logs warnings to stdout and to stderr, which the job writes into
    the same file (each line showed twice); a JobStopped ends the job with its message rather than a traceback."""
    try:
        same_file = os.path.sameopenfile(sys.stdout.fileno(), sys.stderr.fileno())
    except (OSError, ValueError):
        same_file = False
    submitit_logger = logging.getLogger("submitit")
    for handler in list(submitit_logger.handlers):
        if same_file and isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            submitit_logger.removeHandler(handler)
    default_hook = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, JobStopped):
            log(f"stopped: {value}")
        else:
            default_hook(kind, value, tb)

    sys.excepthook = hook


def handles_signal(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler installed for `sig` (Linux: SigCgt in /proc; elsewhere assume so)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return not Path("/proc/self/status").exists()
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (sig - 1) & 1)


def describe_exit(code: int) -> str:
    """"exited with code 2 (config error)", "was killed by SIGKILL"."""
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    meaning = exitcodes.MEANING.get(code)
    return f"exited with code {code}" + (f" ({meaning})" if meaning else "")
