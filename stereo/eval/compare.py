"""`python -m stereo compare RUN_DIR RUN_DIR... [--out DIR]`: compare training runs side by side.

Reads each run's `metrics.jsonl` (one JSON object per logged line: `step`, `time`, `loss`, ..., and validation
lines with `val/` keys) and `config.yaml`; writes `compare.md` (final and best validation metrics, throughput,
config differences as flattened `a.b` keys) and `loss.png`, `val.png` (curves vs step and vs wall time).
Every validation metric here is lower-is-better (EPE, BP-x, D1, losses), so "best" is the minimum.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stereo.eval.report import markdown_table

LOSS_KEYS = ("loss", "loss/init", "loss/seq")
# Validation keys left out of the plots (still in the table): per-image means, counts and the rarer thresholds.
_UNPLOTTED_PARTS = ("mean_image", "images", "pixels", "bp_0.5", "bp_3", "bp_4")


@dataclass
class Run:
    name: str
    path: Path
    records: list[dict[str, Any]]
    config: dict[str, Any]

    def series(self, key: str) -> tuple[list[float], list[float], list[float]]:
        """(steps, wall seconds since start, values) of every line that has a finite number under `key`."""
        rows = [r for r in self.records if _is_number(r.get(key))]
        times = [r.get("time", math.nan) - self.time_origin for r in rows]
        return [r.get("step", math.nan) for r in rows], times, [r[key] for r in rows]

    @property
    def time_origin(self) -> float:
        """`time` is wall seconds since the start; a log holding Unix timestamps instead (> 1e8, i.e. after 1973)
        is made relative to its first line so that runs still line up."""
        first = next((r["time"] for r in self.records if _is_number(r.get("time"))), 0.0)
        return first if first > 1e8 else 0.0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_run(path: Path) -> Run:
    path = Path(path)
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file}: no metrics.jsonl (is {path} a run directory?)")
    records = []
    for number, line in enumerate(metrics_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{metrics_file}:{number}: expected one JSON object per line ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{metrics_file}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.yaml (every run directory has its resolved config)")
    config = yaml.safe_load(config_file.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a mapping, got {type(config).__name__}")
    return Run(path.name, path, records, config)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {"a.b": value}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(runs: list[Run]) -> list[tuple[str, list[Any]]]:
    flat = [flatten(run.config) for run in runs]
    keys = sorted(set().union(*flat))
    missing = "(absent)"
    rows = [(key, [f.get(key, missing) for f in flat]) for key in keys]
    return [(key, values) for key, values in rows if any(v != values[0] for v in values)]


def _val_keys(runs: list[Run]) -> list[str]:
    keys = {k for run in runs for r in run.records for k, v in r.items() if k.startswith("val/") and _is_number(v)}
    return sorted(keys)


def summary_rows(runs: list[Run]) -> tuple[list[str], list[list[Any]]]:
    """One row per quantity, one column per run: steps, time, loss, samples/s, final and best of every val key."""
    header = ["", *(run.name for run in runs)]
    rows: list[list[Any]] = []

    def last(run: Run, key: str) -> float | None:
        values = run.series(key)[2]
        return values[-1] if values else None

    rows.append(["last step", *(last(run, "step") for run in runs)])
    rows.append(["wall time (min)", *((t[-1] / 60 if (t := run.series("time")[1]) else None) for run in runs)])
    for key in LOSS_KEYS:
        rows.append([f"final {key}", *(last(run, key) for run in runs)])
    rows.append(["median samples/s", *((statistics.median(v) if (v := run.series("samples_per_s")[2]) else None)
                                       for run in runs)])
    for key in _val_keys(runs):
        rows.append([f"final {key}", *(last(run, key) for run in runs)])
        rows.append([f"best {key}", *((min(v) if (v := run.series(key)[2]) else None) for run in runs)])
    return header, rows


def _plot(runs: list[Run], keys: list[str], out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(keys), 2, figsize=(12, 3 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys):
        for run in runs:
            steps, times, values = run.series(key)
            row[0].plot(steps, values, label=run.name)
            row[1].plot([t / 3600 for t in times], values, label=run.name)
        row[0].set(title=f"{key} vs step", xlabel="step")
        row[1].set(title=f"{key} vs wall time", xlabel="hours")
        for axis in row:
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)


def compare(run_dirs: list[Path], out_dir: Path) -> str:
    """Write compare.md, loss.png and (when any run validated) val.png into out_dir; return the markdown."""
    runs = [load_run(p) for p in run_dirs]
    if len({run.name for run in runs}) < len(runs):  # same directory names under different parents
        for run in runs:
            run.name = str(run.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = summary_rows(runs)
    text = "# Run comparison\n\n" + markdown_table(header, rows)
    differences = config_differences(runs)
    text += "\n## Config differences\n\n"
    text += markdown_table(["key", *(run.name for run in runs)],
                           [[key, *(json.dumps(v) for v in values)] for key, values in differences]) \
        if differences else "The configs are identical.\n"
    (out_dir / "compare.md").write_text(text)
    loss_keys = [k for k in LOSS_KEYS if any(run.series(k)[2] for run in runs)]
    if loss_keys:
        _plot(runs, loss_keys, out_dir / "loss.png")
    val_keys = [k for k in _val_keys(runs) if not any(part in k.split("/") for part in _UNPLOTTED_PARTS)]
    if val_keys:
        _plot(runs, val_keys, out_dir / "val.png")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl, config.yaml)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output directory (default runs/compare)")


def run(args: argparse.Namespace) -> int:
    try:
        text = compare(args.runs, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 1
    print(text)
    print(f"wrote {args.out}/compare.md and plots", file=sys.stderr)
    return 0
