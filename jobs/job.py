"""The checkpointable submitit job: runs the trainer as a child process and turns Slurm's signals into requeues.

Contract with the trainer (docs/architecture.md): on SIGUSR1 or SIGTERM it finishes the current step on every rank,
writes a checkpoint at that step and exits with EXIT_PREEMPTED; a restart on the same run directory resumes.

- Preemption / time limit: Slurm (or `job._interrupt()`) sends USR2; submitit calls `checkpoint()` on task 0,
  which forwards SIGUSR1 to its trainer, waits for it to save and exit, and hands submitit a fresh copy of this job
  to requeue. The trainer's all-reduced stop flag stops the other ranks at the same step.
- Outside `scontrol requeue` / `scancel`: Slurm sends SIGTERM to every process of the step; submitit ignores it in
  this process, the trainer saves and exits 75, and Slurm requeues (or cancels) the job itself.
- Any other trainer exit code outside a stop request is a failure: the job stops with the reason in its log and is
  not requeued. (A trainer that dies while stopping for a signal is still requeued: it was preempted.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from jobs.rendezvous import trainer_env

EXIT_PREEMPTED = 75  # the trainer's "saved, please requeue" code (docs/architecture.md, Signals)
# After an outside SIGTERM Slurm kills the step within KillWait (30 s on most clusters); wait a little longer.
OUTSIDE_SIGNAL_GRACE_S = 120.0


class JobStopped(RuntimeError):
    """The job ends without a requeue; the message says why (it lands in the job log and the result file)."""


def log(message: str) -> None:
    print(f"[jobs] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def _ignore_usr_signals() -> None:
    # Slurm signals every process of the step: USR2 is submitit's, and SIGUSR1 would kill the trainer before it
    # installs its handler. Ignored dispositions survive exec; the trainer's own handler replaces SIGUSR1's.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@dataclass
class TrainingJob:
    """One Slurm task: one trainer process, with the torch.distributed rendezvous taken from Slurm."""

    python_args: list[str]  # the trainer, run by this job's own python: [-m, stereo, train, RUN_DIR/submit_config.yaml]
    cwd: str
    run_dir: str
    max_requeues: int
    save_timeout_s: float  # how long checkpoint() waits for the trainer to save and exit
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _exit_code: int | None = field(default=None, init=False, repr=False)

    def __getstate__(self) -> dict:
        # A requeue pickles the job again: the running child belongs to this incarnation only.
        return {k: v for k, v in self.__dict__.items() if k not in ("_proc", "_exit_code")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _proc=None, _exit_code=None)

    def __call__(self) -> dict:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        env = trainer_env(os.environ)
        log(f"task {env['RANK']}/{env['WORLD_SIZE']} on {os.uname().nodename}, start {restarts + 1}, "
            f"rendezvous {env['MASTER_ADDR']}:{env['MASTER_PORT']}, run {self.run_dir}")
        if restarts > self.max_requeues:
            raise JobStopped(f"requeued {restarts} times, more than slurm.max_requeues={self.max_requeues}: "
                             "not training again")
        self._start(env)
        code = self._wait(None)
        if code == 0:
            log("trainer finished")
            return {"run_dir": self.run_dir, "restarts": restarts}
        if code == EXIT_PREEMPTED:
            # SIGTERM from Slurm (outside requeue, preemption, scancel), or on other tasks task 0's stop request.
            log(f"trainer saved and exited {EXIT_PREEMPTED} after a stop signal; waiting for Slurm (or task 0) to "
                "requeue or end the job")
            time.sleep(OUTSIDE_SIGNAL_GRACE_S)
            raise JobStopped(f"trainer exited {EXIT_PREEMPTED} after a stop signal but Slurm did not end the job "
                             f"within {OUTSIDE_SIGNAL_GRACE_S:.0f} s: not requeued")
        raise JobStopped(f"trainer {describe_exit(code)} (0 = done, {EXIT_PREEMPTED} = preempted): a failure, "
                         "not requeued; its output is above in this log")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """submitit's hook on USR2 (task 0 only): make the trainer save, then requeue a fresh copy of this job."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if self._proc is not None and self._exit_code is None:
            log(f"preemption/time-limit signal: asking the trainer to checkpoint (SIGUSR1, "
                f"waiting up to {self.save_timeout_s:.0f} s)")
            code = self._wait(self.save_timeout_s, send=signal.SIGUSR1)
            if code is None:
                log("the trainer did not exit in time: killing it; the requeued job resumes from its newest "
                    "complete checkpoint")
                self._proc.kill()
                self._wait(30.0)
            elif code not in (0, EXIT_PREEMPTED):
                # Slurm's SIGTERM reaches every process of the step (data workers, the wandb service): a trainer
                # that dies of that is still a preempted one, and its newest complete checkpoint is intact.
                log(f"the trainer {describe_exit(code)} while stopping; the requeued job resumes from its newest "
                    "complete checkpoint")
        if restarts >= self.max_requeues:
            log(f"not requeued: reached slurm.max_requeues={self.max_requeues} (SLURM_RESTART_COUNT={restarts}); "
                f"the run can be resumed by submitting again with train.run_dir={self.run_dir}")
            return None
        log(f"requeueing (restart {restarts + 1} of at most {self.max_requeues})")
        return submitit.helpers.DelayedSubmission(TrainingJob(self.python_args, self.cwd, self.run_dir,
                                                              self.max_requeues, self.save_timeout_s))

    def _start(self, rendezvous: dict[str, str]) -> None:
        self._proc = subprocess.Popen([sys.executable, *self.python_args], cwd=self.cwd,
                                      env={**os.environ, **rendezvous}, preexec_fn=_ignore_usr_signals)
        # A thread owns the blocking wait: the signal handler (checkpoint) must never contend for Popen's lock.
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        assert self._proc is not None
        self._exit_code = self._proc.wait()

    def _wait(self, timeout_s: float | None, send: signal.Signals | None = None) -> int | None:
        """The trainer's exit code, or None at the timeout; optionally sends it a signal once it handles that signal
        (while it starts up the signal is still ignored; once it exits Python restores the default, which kills)."""
        assert self._proc is not None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._exit_code is None and (deadline is None or time.monotonic() < deadline):
            if send is not None and handles_signal(self._proc.pid, send):
                self._proc.send_signal(send)
                send = None
            time.sleep(0.2)
        return self._exit_code


def handles_signal(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler installed for `sig` (Linux: SigCgt in /proc; elsewhere assume so)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return not Path("/proc/self/status").exists()
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (sig - 1) & 1)


def describe_exit(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
