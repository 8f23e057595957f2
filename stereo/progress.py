"""Progress on stderr: a tqdm bar on a terminal; in a log file (Slurm, `make train 2> log`) plain lines instead, at
most one every PLAIN_INTERVAL_S, since a bar redraws itself with carriage returns that pile up into one line there.

`TrainProgress` is the training loop's (steps, loss, learning rate, samples/s; at the end, where the checkpoint is
and what to run next); `track` wraps any other iteration (evaluation, validation) the same way.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0
DEMO_SHARDS = "shards/demo/"  # a run on the demo data: `make eval BENCH=demo` scores it as validation did
DEMO_PAIR = "shards/demo/motorcycle"  # `make demo-pair` writes the motorcycle pair there

Item = TypeVar("Item")


def is_terminal(stream: TextIO) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


class TrainProgress:
    """Rank 0's view of the loop: `update()` per step, `log(scalars)` per logged window, `close()`, `done(...)`."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, stream: TextIO | None = None,
                 interval_s: float = PLAIN_INTERVAL_S):
        self.total, self.initial, self.step = total, initial, initial
        self.enabled, self.interval_s = enabled, interval_s
        self.stream = stream or sys.stderr
        self.start = self.printed_at = time.monotonic()
        self.printed_step = initial
        self.fields: dict[str, str] = {}
        self.fields_step = initial
        self.bar = (tqdm(total=total, initial=initial, desc="train", unit="step", file=self.stream,
                         dynamic_ncols=True, mininterval=2.0)
                    if enabled and is_terminal(self.stream) else None)

    def update(self, steps: int = 1) -> None:
        self.step += steps
        if self.bar is not None:
            self.bar.update(steps)
        self._maybe_print()

    def log(self, scalars: dict[str, float], step: int | None = None) -> None:
        """The logged window's loss, learning rate and throughput (of `step`, default the current one), shown
        beside the bar or in the next line."""
        self.fields = {"loss": f"{scalars['loss']:.3f}", "lr": f"{scalars['lr']:.2e}",
                       "samples/s": f"{scalars['samples_per_s']:.2f}"}
        self.fields_step = self.step if step is None else step
        if self.bar is not None:
            self.bar.set_postfix(self.fields, refresh=False)
        elif self.enabled and self.printed_step == self.initial:  # the first numbers: show at once that it moves
            self._print_line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.step != self.printed_step:
            self._print_line()

    def done(self, exit_code: int, run_dir: Path, checkpoint: Path | None, cfg: Any) -> None:
        """After a finished run: where its checkpoint is and the commands to run next, its directory filled in."""
        if not self.enabled or exit_code != 0:
            return
        print(next_steps(run_dir, checkpoint, cfg, time.monotonic() - self.start), flush=True)

    def _maybe_print(self) -> None:
        if self.bar is None and self.enabled and time.monotonic() - self.printed_at >= self.interval_s:
            self._print_line()

    def _print_line(self) -> None:
        now = time.monotonic()
        elapsed, done = now - self.start, self.step - self.initial
        left = f", ~{duration(elapsed / done * (self.total - self.step))} left" if 0 < done and self.step < self.total \
            else ""
        fields = "".join(f"  {k} {v}" for k, v in self.fields.items())
        if fields and self.fields_step < self.step:  # a stop between two logged steps: say whose numbers they are
            fields += f" (logged at step {self.fields_step})"
        print(f"train step {self.step}/{self.total} ({100 * self.step // max(self.total, 1)}%){fields}  "
              f"[{duration(elapsed)}{left}]", file=self.stream, flush=True)
        self.printed_at, self.printed_step = now, self.step


def make_var(name: str, value: object) -> str:
    """`NAME=value` as one shell word, for the commands we print (a run directory may hold spaces or quotes)."""
    return shlex.quote(f"{name}={value}")


def make_command(target: str, **variables: object) -> str:
    """`make TARGET NAME=value ...`, each assignment one shell word."""
    return " ".join(["make", target, *(make_var(name, value) for name, value in variables.items())])


def resume_command(run_dir: Path) -> str:
    """The command that continues a stopped run in its own directory (`make resume` reads RUN_DIR/config.yaml)."""
    return make_command("resume", RUN=run_dir)


def next_steps(run_dir: Path, checkpoint: Path | None, cfg: Any, seconds: float) -> str:
    run = str(run_dir)
    demo = any(str(spec.shards).startswith(DEMO_SHARDS) for spec in cfg.data.val)
    bench = "BENCH=demo" if demo else "BENCH=<kitti15|middeval3|eth3d|...> DATA=<its directory>"
    done = f"done in {duration(seconds)}: checkpoint {checkpoint if checkpoint is not None else '(none)'}"
    if any(tag.startswith("sweep:") for tag in cfg.logging.tags):  # a sweep's trial: the sweep says what next, once
        return done
    lines = [done,
             "next:",
             f"  make eval {make_var('CKPT', run)} {bench} {make_var('OUT', run + '/eval')}"
             + ("   # the demo validation set, as scored above" if demo else ""),
             f"  make demo-pair && make infer {make_var('CKPT', run)} LEFT={DEMO_PAIR}/left.png "
             f"RIGHT={DEMO_PAIR}/right.png {make_var('OUT', run + '/motorcycle')}",
             f"  make export {make_var('RUN', run)} {make_var('OUT', run + '/model.pth')}   # released-format "
             "weights (EMA)",
             f"  make compare {make_var('RUNS', run + ' runs/<another run>')}"]
    return "\n".join(lines)


def track(items: Iterable[Item], total: int | None, desc: str, unit: str, enabled: bool = True,
          stream: TextIO | None = None, interval_s: float = PLAIN_INTERVAL_S) -> Iterator[Item]:
    """`items`, with a transient tqdm bar on a terminal, else a plain line at most every `interval_s` (and a last
    one if any was printed)."""
    stream = stream or sys.stderr
    if not enabled:
        yield from items
        return
    if is_terminal(stream):
        yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False, file=stream, dynamic_ncols=True)
        return
    start = printed_at = time.monotonic()
    count, printed = 0, False
    of = f"/{total}" if total is not None else ""
    for count, item in enumerate(items, 1):
        yield item
        if time.monotonic() - printed_at >= interval_s:
            print(f"{desc}: {count}{of} {unit} [{duration(time.monotonic() - start)}]", file=stream, flush=True)
            printed_at, printed = time.monotonic(), True
    if printed:
        print(f"{desc}: {count}{of} {unit} done [{duration(time.monotonic() - start)}]", file=stream, flush=True)
