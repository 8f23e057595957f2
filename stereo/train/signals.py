"""Preemption, Ctrl-C and on-demand checkpoints (the contract with the Slurm wrapper, docs/training.md#signals).

SIGUSR1 / SIGTERM / SIGINT (Ctrl-C): finish the step in progress on every rank, checkpoint at that step, exit
stereo.exitcodes.PREEMPTED (75). A second Ctrl-C at least INTERRUPT_DEBOUNCE_S later stops at once without saving
(exit 130); one keypress reaches a process more than once (the terminal's group signal, then torchrun forwarding
it), hence the debounce.
SIGUSR2 (or `request_checkpoint`): checkpoint at the end of the current step and keep training.
The handlers only set flags; the loop all-reduces them (max) so that every rank acts alike: after each forward
(with the non-finite-loss flag, before any backward) and once more at the end of each step, so that a signal that
lands during backward, the optimizer step or validation is saved at that step, not one step later.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stereo.train.failures import Aborted

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
CHECKPOINT_SIGNAL = signal.SIGUSR2
INTERRUPT_DEBOUNCE_S = 2.0


@dataclass
class Agreed:
    """What all ranks decided."""

    bad_loss: bool
    stop: bool
    checkpoint: bool


class TrainerSignals:
    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.stop_signal: int | None = None
        self.stop_time = 0.0
        self.announced = False
        self.checkpoint_requested = False

    def install(self) -> "TrainerSignals":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop)
        signal.signal(CHECKPOINT_SIGNAL, self._on_checkpoint)
        return self

    def uninstall(self) -> None:
        """Back to the defaults once the loop is over: a signal during the exit ends the process."""
        for sig in (*STOP_SIGNALS, CHECKPOINT_SIGNAL):
            signal.signal(sig, signal.SIG_DFL)

    def _on_stop(self, signum, _frame) -> None:
        now = time.monotonic()
        if signum == signal.SIGINT and self.stop_signal == signal.SIGINT \
                and now - self.stop_time > INTERRUPT_DEBOUNCE_S:
            raise Aborted("interrupted again")
        if self.stop_signal is None:  # no printing here: the main thread may be inside a write to stderr
            self.stop_signal, self.stop_time = signum, now

    def _on_checkpoint(self, _signum, _frame) -> None:
        self.checkpoint_requested = True

    def agree(self, bad_loss: torch.Tensor | None = None) -> Agreed:
        """One all-reduce (max) of [this rank's non-finite loss, stop, checkpoint]: every rank gets the same answer.

        `bad_loss` stays on the device until here, so this is the micro-batch's only host sync besides logging."""
        device = bad_loss.device if bad_loss is not None else _collective_device()
        flags = torch.tensor([0.0, float(self.stop_signal is not None), float(self.checkpoint_requested)],
                             device=device)
        if bad_loss is not None:
            flags[0] = bad_loss.float().reshape(())
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, stop, ckpt = (bool(v) for v in flags.tolist())
        if self.stop_signal is not None and not self.announced:
            self.announced = True  # one line per signal and process, however often it was delivered
            print(f"[rank {self.rank}] {signal.Signals(self.stop_signal).name}: saving a checkpoint at the end of the "
                  "step in progress, then exiting" + (" (Ctrl-C again to stop without saving)"
                                                      if self.stop_signal == signal.SIGINT else ""),
                  file=sys.stderr, flush=True)
        return Agreed(bad_loss=bad, stop=stop, checkpoint=ckpt)

    def checkpoint_done(self) -> None:
        self.checkpoint_requested = False


def _collective_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def request_checkpoint(pid: int) -> None:
    """On-demand checkpoint of a running trainer (any rank's pid; torchrun forwards nothing, so signal each rank)."""
    os.kill(pid, CHECKPOINT_SIGNAL)
