"""Preemption and on-demand checkpoints (the contract with the Slurm wrapper, docs/architecture.md).

SIGUSR1 / SIGTERM: finish the current step on every rank, checkpoint at that step, exit EXIT_PREEMPTED (75).
SIGUSR2 (or `request_checkpoint`): checkpoint at the end of the current step and keep training.
The handlers only set flags; the loop all-reduces them (max) after each step so that every rank acts alike.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
CHECKPOINT_SIGNAL = signal.SIGUSR2


@dataclass
class Agreed:
    """What all ranks decided after a step."""

    bad_loss: bool
    stop: bool
    checkpoint: bool


class TrainerSignals:
    def __init__(self) -> None:
        self.stop_signal: int | None = None
        self.checkpoint_requested = False

    def install(self) -> "TrainerSignals":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop)
        signal.signal(CHECKPOINT_SIGNAL, self._on_checkpoint)
        return self

    def _on_stop(self, signum, _frame) -> None:
        self.stop_signal = signum

    def _on_checkpoint(self, _signum, _frame) -> None:
        self.checkpoint_requested = True

    def agree(self, bad_loss: torch.Tensor) -> Agreed:
        """One all-reduce (max) of [this rank's non-finite loss, stop, checkpoint]: every rank gets the same answer.

        `bad_loss` stays on the device until here, so this is the step's only host sync besides logging.
        """
        flags = torch.stack([bad_loss.float().reshape(()),
                             bad_loss.new_tensor(float(self.stop_signal is not None), dtype=torch.float32),
                             bad_loss.new_tensor(float(self.checkpoint_requested), dtype=torch.float32)])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, stop, ckpt = (bool(v) for v in flags.tolist())
        return Agreed(bad_loss=bad, stop=stop, checkpoint=ckpt)

    def checkpoint_done(self) -> None:
        self.checkpoint_requested = False


def request_checkpoint(pid: int) -> None:
    """On-demand checkpoint of a running trainer (any rank's pid; torchrun forwards nothing, so signal each rank)."""
    os.kill(pid, CHECKPOINT_SIGNAL)
