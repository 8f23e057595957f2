"""Compare training runs side by side (`python -m stereo compare RUN_DIR... [--out DIR]`, stereo/compare_cli.py).

Reads each run's `metrics.jsonl` (one JSON object per logged line: `step`, `time`, `loss`, ..., and validation
lines with `val/` keys) and `config.yaml`; writes `compare.md` and `loss.png`, `val.png` (curves vs step and vs
wall time). Runs are named by what differs between their configs (`optim.lr=0.0002`), not by their directories,
and ordered by the main metric (`--metric`, default `val/epe/pooled`, lower is better): its best value after
step 0 (every fine-tune validates its shared starting weights at step 0) comes first in the table, then the other
pooled validation metrics; counters (images, pixels, seconds per image) and per-image means are left out.

A sweep's trials (`--sweep`) are ranked by stereo/sweep/compare.py, which uses these pieces.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stereo.config.load import flatten
from stereo.eval.metrics import with_unit
from stereo.pictures import markdown_table

DEFAULT_METRIC = "val/epe/pooled"
LOSS_KEYS = ("loss", "loss/init", "loss/seq")
# Pooled validation metrics left out of the plots (still in the table): the rarer thresholds.
_UNPLOTTED = ("bp_0.5", "bp_3", "bp_4")
# Config keys that differ between any two runs without making them different experiments.
_NOT_DIFFERENCES = ("train.run_dir",)


@dataclass
class Run:
    name: str  # what the tables and legends call it
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

    def best(self, key: str, direction: str) -> tuple[float, int] | None:
        """(best value, its step) over the validations after step 0, or None."""
        steps, _, values = self.series(key)
        later = [(v, s) for s, v in zip(steps, values) if s > 0]
        if not later:
            return None
        return min(later) if direction == "min" else max(later, key=lambda vs: (vs[0], -vs[1]))

    def last(self, key: str) -> float | None:
        values = self.series(key)[2]
        return values[-1] if values else None


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


def config_differences(runs: list[Run]) -> list[tuple[str, list[Any]]]:
    flat = [flatten(run.config) for run in runs]
    keys = sorted(set().union(*flat) - set(_NOT_DIFFERENCES))
    missing = "(absent)"
    rows = [(key, [f.get(key, missing) for f in flat]) for key in keys]
    return [(key, values) for key, values in rows if any(v != values[0] for v in values)]


def show(value: Any) -> str:
    """A config value the way one would write it as an override."""
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def name_by_differences(runs: list[Run]) -> None:
    """Each run's name becomes what sets it apart (`optim.lr=0.0002 train.steps=30`); the directory name where
    the configs are identical or two runs would read the same."""
    differences = config_differences(runs)
    labels = [" ".join(f"{key}={show(values[i])}" for key, values in differences) for i in range(len(runs))]
    if all(labels) and len(set(labels)) == len(labels):
        for run, label in zip(runs, labels):
            run.name = label
    elif len({run.name for run in runs}) < len(runs):  # same directory names under different parents
        for run in runs:
            run.name = str(run.path)


def val_keys(runs: list[Run], metric: str | None) -> list[str]:
    """The pooled validation metrics (counters and per-image means left out), the main metric first."""
    keys = {k for run in runs for r in run.records for k, v in r.items()
            if k.startswith("val/") and k.endswith("/pooled") and _is_number(v)}
    return ([metric] if metric else []) + sorted(keys - {metric})


def main_metric(runs: list[Run], preferred: str) -> str | None:
    """`preferred` if any run logged it, else the first pooled EPE (one validation set named in the key)."""
    logged = {k for run in runs for r in run.records for k, v in r.items() if _is_number(v)}
    if preferred in logged:
        return preferred
    return next((k for k in sorted(logged) if k.startswith("val/") and k.endswith("epe/pooled")), None)


def rank(runs: list[Run], metric: str | None, direction: str) -> list[Run]:
    """Best first by the metric's best value after step 0; runs without one keep their order at the end."""
    if metric is None:
        return list(runs)
    sign = 1.0 if direction == "min" else -1.0

    def key(run: Run) -> tuple[bool, float]:
        best = run.best(metric, direction)
        return best is None, sign * best[0] if best else 0.0

    return sorted(runs, key=key)


def minutes_seconds(seconds: float | None) -> str | None:
    return None if seconds is None else f"{int(seconds // 60)}:{int(round(seconds % 60)):02d}"


def repeated_keys(runs: list[Run], keys: list[str]) -> list[str]:
    """`bp_3` keys whose final values equal their `d1` counterpart's in every run. Expected where all ground truth
    is under 60 px (the demo data): D1 counts errors > 3 px and > 5 % of the ground truth, and 5 % of 60 is 3."""
    return [key for key in keys if "bp_3" in key and key.replace("bp_3", "d1") in keys
            and all(run.last(key) == run.last(key.replace("bp_3", "d1")) for run in runs)]


def summary_rows(runs: list[Run], metric: str | None, direction: str) -> tuple[list[str], list[list[Any]]]:
    """One row per quantity, one column per run: the main metric's best (and its step) and final value, the other
    pooled validation metrics' final values (a bp_3 equal to D1 everywhere left out), then steps, time, losses and
    throughput."""
    header = ["", *(run.name for run in runs)]
    rows: list[list[Any]] = []
    if metric is not None:
        bests = [run.best(metric, direction) for run in runs]
        rows.append([f"best {with_unit(metric)}", *(b[0] if b else None for b in bests)])
        rows.append([f"step of best {metric}", *(b[1] if b else None for b in bests)])
    keys = val_keys(runs, metric)
    for key in (k for k in keys if k not in repeated_keys(runs, keys)):
        rows.append([f"final {with_unit(key)}", *(run.last(key) for run in runs)])
    rows.append(["last step", *(run.last("step") for run in runs)])
    rows.append(["wall time (m:ss)", *(minutes_seconds(t[-1] if (t := run.series("time")[1]) else None)
                                       for run in runs)])
    for key in LOSS_KEYS:
        rows.append([f"final {key}", *(run.last(key) for run in runs)])
    rows.append(["median samples/s", *((statistics.median(v) if (v := run.series("samples_per_s")[2]) else None)
                                       for run in runs)])
    rows.append(["run directory", *(str(run.path) for run in runs)])
    return header, rows


def report(runs: list[Run], metric: str | None, direction: str) -> str:
    """The comparison table and the config differences, as markdown (runs already named and ordered)."""
    order = f"ordered by best {metric} ({'lower' if direction == 'min' else 'higher'} is better, validations " \
            "after step 0)" if metric else "no validation metric logged"
    header, rows = summary_rows(runs, metric, direction)
    text = f"Runs {order}.\n\n" + markdown_table(header, rows)
    if repeated := repeated_keys(runs, val_keys(runs, metric)):
        text += (f"\n{', '.join(repeated)} left out: equal to D1 in every run, as expected where all ground truth is "
                 "under 60 px (D1 counts errors > 3 px and > 5 % of the ground truth).\n")
    differences = config_differences(runs)
    text += "\n## Config differences\n\n"
    text += markdown_table(["key", *(run.name for run in runs)],
                           [[key, *(show(v) for v in values)] for key, values in differences]) \
        if differences else "The configs are identical.\n"
    return text


def _plot(runs: list[Run], keys: list[str], out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    legend_in = 0.2 * len(runs) + 0.3  # one line per run above the panels
    fig, axes = plt.subplots(len(keys), 2, figsize=(12, 2.6 * len(keys) + legend_in), squeeze=False)
    for row, key in zip(axes, keys):
        for run in runs:
            steps, times, values = run.series(key)
            row[0].plot(steps, values, marker="." if len(values) < 20 else None, label=run.name)
            row[1].plot([t / 60 for t in times], values, marker="." if len(values) < 20 else None)
        row[0].set(title=f"{key} vs step", xlabel="step", ylabel=with_unit(key))
        row[0].xaxis.set_major_locator(MaxNLocator(integer=True))
        row[1].set(title=f"{key} vs wall time", xlabel="wall time (minutes)", ylabel=with_unit(key))
        for axis in row:
            axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=1, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - legend_in / fig.get_figheight()))
    fig.savefig(out_path, dpi=80)
    plt.close(fig)


def write_plots(runs: list[Run], metric: str | None, out_dir: Path) -> list[str]:
    """loss.png and (when any run validated) val.png, main metric first; the names written."""
    written = []
    loss_keys = [k for k in LOSS_KEYS if any(run.series(k)[2] for run in runs)]
    if loss_keys:
        _plot(runs, loss_keys, out_dir / "loss.png")
        written.append("loss.png")
    plotted = [k for k in val_keys(runs, metric) if k == metric or k.split("/")[-2] not in _UNPLOTTED]
    if plotted:
        _plot(runs, plotted, out_dir / "val.png")
        written.append("val.png")
    return written


def compare(run_dirs: list[Path], out_dir: Path, metric: str = DEFAULT_METRIC, direction: str = "min") -> str:
    """Write compare.md, loss.png and (when any run validated) val.png into out_dir; return the markdown."""
    runs = [load_run(p) for p in run_dirs]
    name_by_differences(runs)
    metric = main_metric(runs, metric)
    runs = rank(runs, metric, direction)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = "# Run comparison\n\n" + report(runs, metric, direction)
    (out_dir / "compare.md").write_text(text)
    write_plots(runs, metric, out_dir)
    return text
