"""The trainer's one exit path: any exception on any rank ends this process and its loader workers within seconds,
with one paragraph saying what failed, what was kept, and a documented exit code (stereo/exitcodes.py).

Why this needs care: the loader workers ignore SIGTERM (Slurm signals every process of a job and the trainer must
save first), and Python's exit-time multiprocessing cleanup stops leftover workers with SIGTERM and then waits for
them forever. So the exit path kills the workers itself, and ends the process with os._exit once its output is
flushed: nothing at interpreter shutdown (a wandb atexit hook, a half-dead process group) can hang it. The other
ranks notice the dead peer (their collective fails) and take the same path.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stereo import exitcodes
from stereo.config.errors import ConfigError


class RunDirBusy(RuntimeError):
    """Another live trainer holds the run directory."""


class Aborted(RuntimeError):
    """A second Ctrl-C: stop now, without a checkpoint."""


PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote process exited", "Broken pipe")


def peer_lost(exc: BaseException) -> bool:
    """A collective failed because another rank's process is gone (gloo and NCCL say so in these words)."""
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in PEER_LOST)


def exit_code_for(exc: BaseException) -> int:
    from stereo.data.stream import BadDataError
    from stereo.train.checkpoint import CheckpointError

    if isinstance(exc, PeerFailed):
        return exc.code
    for kind, code in ((ConfigError, exitcodes.CONFIG), (BadDataError, exitcodes.DATA),
                       (CheckpointError, exitcodes.CHECKPOINT), (RunDirBusy, exitcodes.RUN_DIR_BUSY)):
        if isinstance(exc, kind):
            return code
    return exitcodes.INTERNAL


def finish_within(fn: Callable[[], object], timeout_s: float) -> None:
    """Run a best-effort cleanup (wandb's finish) without letting it hold the exit."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout_s)


def failure_report(exc: BaseException, rank: int, run_dir: Path | None, code: int) -> str:
    what = str(exc).strip()
    if "Original Traceback" in what:  # re-raised from a DataLoader worker: its last line says what happened
        last = what.splitlines()[-1]
        what = last.split(": ", 1)[1] if ": " in last else last
    what = what or type(exc).__name__
    if code == exitcodes.INTERNAL:
        what = f"{type(exc).__name__}: {what}"
    return (f"[rank {rank}] training stopped ({exitcodes.MEANING[code]}, exit code {code}): {what}\n"
            f"[rank {rank}] {what_is_kept(run_dir, code)}")


def what_is_kept(run_dir: Path | None, code: int) -> str:
    """The closing line of every failure: the checkpoint a restart resumes from (not verified here: a damaged one
    is named above), or why there is none."""
    from stereo.train.checkpoint import complete_steps, step_dir_name

    if run_dir is None:
        return "no run directory was created"
    if code == exitcodes.RUN_DIR_BUSY:
        return f"nothing in {run_dir} was changed: it belongs to the trainer that holds its lock"
    steps = complete_steps(Path(run_dir) / "checkpoints")
    if not steps:
        return f"no checkpoint was written yet in {run_dir}"
    return f"the newest complete checkpoint is {Path(run_dir) / 'checkpoints' / step_dir_name(steps[-1])} " \
           f"(step {steps[-1]})"


def unwritable_run_dir(exc: BaseException, run_dir: Path | None) -> Exception | None:
    """A write into the run directory that the system refused (made read-only, permissions, full disk) as the
    checkpoint error it is (the run cannot save), naming the path and the cause; None for anything else."""
    refused = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)
    if not isinstance(exc, OSError) or exc.errno not in refused or run_dir is None or not exc.filename:
        return None
    path = Path(os.fsdecode(exc.filename)).absolute()
    if not path.is_relative_to(Path(run_dir).absolute()):
        return None
    from stereo.train.checkpoint import CheckpointError, describe_write_error

    return CheckpointError(f"cannot write {path}: {describe_write_error(path, exc)}; the run directory {run_dir} "
                           "must stay writable for the whole run")


class PeerFailed(RuntimeError):
    """Another rank failed first; this rank stops with the same exit code (its report is on that rank)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class ExitContext:
    """What the exit path needs to know, filled in by the trainer as it starts: its rank, the run directory (to
    say which checkpoint is kept) and cleanups to run with the exit code (wandb's finish, the run-dir lock)."""

    rank: int = 0
    run_dir: Path | None = None
    cleanups: list[Callable[[int], object]] = field(default_factory=list)


def agree_on_failure(context: ExitContext, fn: Callable[[], object]) -> object:
    """Run `fn` on rank 0 while the other ranks wait; if it raises, every rank stops with its exit code."""
    import torch.distributed as dist

    outcome: list = [None, None]
    if context.rank == 0:
        try:
            outcome[0] = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on this rank as it was
            outcome[1] = (exit_code_for(exc), str(exc))
            if not dist.is_initialized():
                raise
            dist.broadcast_object_list([None, outcome[1]], src=0)
            raise
    if dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise PeerFailed(*outcome[1])
    return outcome[0]


def exit_now(code: int) -> None:
    """Flush and leave without interpreter shutdown (see the module docstring)."""
    from stereo.data.loader import stop_workers

    stop_workers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_to_exit(train: Callable[[], int], context: ExitContext) -> None:
    """Run `train()` and end the process with its exit code; any exception becomes a report and an exit code."""
    try:
        code = train()
    except BaseException as exc:  # noqa: BLE001 - the one place that turns any failure into an exit code
        if isinstance(exc, (KeyboardInterrupt, Aborted)):
            code, exc = exitcodes.INTERRUPTED, Aborted("interrupted again: stopped without saving the step in progress")
        else:
            exc = unwritable_run_dir(exc, context.run_dir) or exc
            code = exit_code_for(exc)
            if peer_lost(exc):
                exc = PeerFailed(code, "another rank's process is gone (its report is above, unless it was killed "
                                       "without one): this rank stops too")
            elif code == exitcodes.INTERNAL:
                traceback.print_exc()
        if isinstance(exc, PeerFailed):
            print(f"[rank {context.rank}] stopping: {exc}\n[rank {context.rank}] "
                  f"{what_is_kept(context.run_dir, code)}", file=sys.stderr, flush=True)
        else:
            print(failure_report(exc, context.rank, context.run_dir, code), file=sys.stderr, flush=True)
    for cleanup in reversed(context.cleanups):
        finish_within(lambda: cleanup(code), 10.0)
    exit_now(code)
