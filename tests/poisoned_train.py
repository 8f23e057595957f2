"""The trainer with a poisoned loss, for the fault tests: the fault enters from here, the training loop has no hook.

`python tests/poisoned_train.py --nan-steps 3,5,5 [--nan-rank R] train CONFIG ...` (or as torchrun's script) runs
`python -m stereo train CONFIG ...` with the loss of one attempt at step 3 and of two at step 5 made NaN (a dropped
micro-batch is retried at the same step; steps are numbered as in the log), on rank R only (default: every rank).
The step being computed is read from the loop's own counter, which its end-of-step object holds.
`--slow-steps S` makes every loss take S seconds more: a step in progress that outlasts a signal's debounce on any
machine, however fast.
"""

import argparse
import os
import sys
import time
from collections import Counter

from stereo.cli import main
from stereo.train import loop


class PoisonedLoss:
    def __init__(self, loss, steps: Counter, slow_s: float):
        self.loss, self.steps, self.slow_s, self.state = loss, steps, slow_s, None

    def __call__(self, *args, **kwargs):
        terms = self.loss(*args, **kwargs)
        time.sleep(self.slow_s)
        step = self.state.step + 1  # the step being computed
        if self.steps[step] > 0:
            self.steps[step] -= 1
            terms["total"] = terms["total"] * float("nan")
        return terms


def poison(steps: Counter, slow_s: float) -> None:
    poisoned = PoisonedLoss(loop.stereo_loss, steps, slow_s)

    class WatchedStepEnd(loop.StepEnd):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            poisoned.state = self.state  # the loop's RunState, built before the first step

    loop.stereo_loss, loop.StepEnd = poisoned, WatchedStepEnd


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nan-steps", default="", help="comma-separated steps, one entry per poisoned attempt")
    parser.add_argument("--slow-steps", type=float, default=0.0, help="seconds added to each loss")
    parser.add_argument("--nan-rank", type=int, default=None, help="poison this rank only (default: every rank)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the `python -m stereo` command line")
    args = parser.parse_args()
    if args.nan_rank is None or args.nan_rank == int(os.environ.get("RANK", "0")):
        poison(Counter(int(step) for step in args.nan_steps.split(",") if step), args.slow_steps)
    sys.exit(main(args.command))
