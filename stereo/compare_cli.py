"""`python -m stereo compare RUN_DIR... [--out DIR]` or `--sweep SWEEP`: compare training runs, or a sweep's trials.

Runs are compared by stereo/eval/compare.py. With `--sweep`, the sweep's trials are ranked by the sweep's metric
(`ranking` in compare.md, one row per trial with its varied keys), `sweep.png` plots the best value against each
varied key, and the table and curves cover the best few trials (`--best`): stereo/sweep/compare.py. This command
sits above both, so that evaluation never imports sweeps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stereo.config.errors import ConfigError
from stereo.eval.compare import DEFAULT_METRIC, compare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (each with metrics.jsonl, config.yaml)")
    parser.add_argument("--sweep", help="compare a sweep's trials instead: its file or directory (runs/sweeps/NAME)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default runs/compare, or the sweep's compare/)")
    parser.add_argument("--metric", default=None, help=f"the main metric (default {DEFAULT_METRIC}, or the sweep's)")
    parser.add_argument("--direction", choices=("min", "max"), default=None, help="min (default) or max is better")
    parser.add_argument("--best", type=int, default=4, help="sweep: how many of the best trials get curves")


def run(args: argparse.Namespace) -> int:
    if bool(args.runs) == bool(args.sweep):
        print("compare: give run directories (RUNS=\"runs/a runs/b\") or --sweep SWEEP, not both",
              file=sys.stderr)
        return 2
    try:
        if args.sweep:
            from stereo.sweep.compare import compare_sweep

            text, out = compare_sweep(args.sweep, args.out, args.metric, args.direction, args.best)
        else:
            out = args.out or Path("runs/compare")
            text = compare(args.runs, out, args.metric or DEFAULT_METRIC, args.direction or "min")
    except ConfigError:
        raise  # a bad sweep file: exit 2 with the config error (stereo/cli.py)
    except (FileNotFoundError, ValueError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 1
    print(text)
    print(f"wrote {out}/compare.md and plots", file=sys.stderr)
    return 0
