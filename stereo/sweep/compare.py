"""`compare --sweep SWEEP`: the trials ranked by the sweep's metric, the metric against each varied key, and the
comparison table and curves of the best few (stereo/eval/compare.py), into `runs/sweeps/<name>/compare/`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from stereo.eval.compare import Run, load_run, rank, report, show, write_plots
from stereo.pictures import markdown_table
from stereo.progress import make_command
from stereo.sweep.book import SweepDir, TrialRecord, shown_state, trial_progress
from stereo.sweep.spec import SweepSpec, load_sweep


def compare_sweep(sweep: str, out: Path | None, metric: str | None, direction: str | None,
                  best: int) -> tuple[str, Path]:
    """Write compare.md, sweep.png, loss.png and val.png; return the markdown and the output directory."""
    book = SweepDir(load_sweep(sweep).name)
    if not book.exists():
        raise FileNotFoundError(f"{book.path}: the sweep was never started ({make_command('sweep', SWEEP=sweep)})")
    spec, records = load_sweep(book.spec_file), book.read()
    metric, direction = metric or spec.metric, direction or spec.direction
    out = out or book.path / "compare"
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Run] = {}
    for record in records:
        if (Path(record.run_dir) / "metrics.jsonl").is_file() and (Path(record.run_dir) / "config.yaml").is_file():
            runs[record.trial] = load_run(Path(record.run_dir))
            runs[record.trial].name = f"{record.trial} {' '.join(record.overrides)}"
    ordered = rank(list(runs.values()), metric, direction)
    by_run = {id(run): record for record in records if (run := runs.get(record.trial)) is not None}
    order = [by_run[id(run)] for run in ordered] + [r for r in records if r.trial not in runs]
    text = f"# Sweep {spec.name}\n\n{len(records)} trials ranked by their best {metric} " \
           f"({'lower' if direction == 'min' else 'higher'} is better; validations after step 0).\n\n"
    text += markdown_table(*_ranking(spec, order, runs, metric, direction))
    plot_against_keys(spec, records, runs, metric, direction, out / "sweep.png")
    top = [run for run in ordered if run.best(metric, direction)][:best]
    if top:
        text += f"\n## The best {len(top)}\n\n" + report(top, metric, direction)
        write_plots(top, metric, out)
    (out / "compare.md").write_text(text)
    return text, out


def _ranking(spec: SweepSpec, order: list[TrialRecord], runs: dict[str, Run], metric: str,
             direction: str) -> tuple[list[str], list[list[Any]]]:
    header = ["rank", "trial", *spec.varied, f"best {metric}", "at step", f"final {metric}", "step", "state"]
    rows = []
    for place, record in enumerate(order, 1):
        run = runs.get(record.trial)
        best = run.best(metric, direction) if run else None
        values = varied_values(record)
        rows.append([place if best else "-", record.trial, *(show(values.get(k)) for k in spec.varied),
                     best[0] if best else None, best[1] if best else None, run.last(metric) if run else None,
                     run.last("step") if run else None,
                     shown_state(record, trial_progress(record.run_dir, spec.metric, spec.direction))])
    return header, rows


def varied_values(record: TrialRecord) -> dict[str, Any]:
    return {key: yaml.safe_load(value) for key, value in (text.split("=", 1) for text in record.overrides)}


def plot_against_keys(spec: SweepSpec, records: list[TrialRecord], runs: dict[str, Run], metric: str,
                      direction: str, path: Path) -> None:
    """One panel per varied key: each trial's best metric against its value (log axis for log-uniform draws
    and for positive values spanning a factor 3 or more; categories for anything not a number)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(record.trial, varied_values(record), best[0]) for record in records
              if record.trial in runs and (best := runs[record.trial].best(metric, direction))]
    keys = spec.varied
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys) + 0.5, 4), squeeze=False)
    for axis, key in zip(axes[0], keys):
        xs = [_number(values.get(key)) for _, values, _ in points]
        if points and all(x is not None for x in xs):
            positive = all(x > 0 for x in xs)
            log = spec.random_keys.get(key) is not None and spec.random_keys[key].kind == "log_uniform" \
                or positive and max(xs) >= 3 * min(xs)
            if log:
                axis.set_xscale("log")
        else:
            names = sorted({show(values.get(key)) for _, values, _ in points})
            xs = [names.index(show(values.get(key))) for _, values, _ in points]
            axis.set_xticks(range(len(names)), names)
            axis.set_xlim(-0.5, len(names) - 0.5)
        ys = [y for *_, y in points]
        axis.scatter(xs, ys, s=30, zorder=3)
        span = (max(ys) - min(ys)) or 1.0 if ys else 1.0
        for i, ((trial, _, _), x, y) in enumerate(zip(points, xs, ys)):
            # labels of trials at (about) the same point are stacked, not drawn over each other
            below = sum(xs[j] == x and abs(ys[j] - y) < 0.08 * span for j in range(i))
            axis.annotate(trial, (x, y), textcoords="offset points", xytext=(5, 3 + 9 * below), fontsize=8)
        axis.margins(x=0.12, y=0.2)  # room for the labels
        axis.set(xlabel=key, ylabel=f"best {metric}", title=f"best {metric}\nvs {key}")
        axis.grid(alpha=0.3)
    fig.suptitle(f"sweep {spec.name}: {len(points)} of {len(records)} trials validated after step 0", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
