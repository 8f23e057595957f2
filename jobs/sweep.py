"""`python -m stereo sweep [--local] SWEEP [a.b=value ...]` and `python -m stereo sweep-status SWEEP`.

`sweep` loads the sweep file and validates every trial's config (exit 2 naming the trial and the key) before it
writes or queues anything; then it writes `runs/sweeps/<name>/` (stereo/sweep/book.py) and queues the trials that
still need to run as one Slurm job array, at most `max_concurrent` at once, each an ordinary checkpointed,
requeueing TrainingJob (jobs/job.py) in its own run directory. With `--local` they run here one after another.

Run again, it resumes: completed trials are kept, queued or running ones left alone, and failed, cancelled or
interrupted ones submitted again into their own run directories, where the trainer resumes from the newest
checkpoint. SWEEP is the sweep file or the sweep's directory.
"""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path

import submitit
import yaml

from jobs.job import TrainingJob
from jobs.state import FINAL_STATES, query
from jobs.record import Submission
from jobs.submit import make_executor, refuse_busy, submit_array
from stereo.config import ConfigError, dump_yaml
from stereo.eval.metrics import with_unit
from stereo.pictures import markdown_table
from stereo.exitcodes import INTERNAL, RUN_DIR_BUSY
from stereo.progress import make_command
from stereo.train.failures import RunDirBusy
from stereo.train.run_files import wandb_run_id
from stereo.sweep.book import (COMPLETED, TRIAL_CONFIG, SweepBusy, SweepDir, TrialRecord, shown_state,
                               trial_progress)
from stereo.sweep.local import run_trials
from stereo.sweep.spec import SweepSpec, Trial, build_trials, load_sweep

SLURM_WAITING = {"PENDING": "queued", "REQUEUED": "requeued", "REQUEUE_HOLD": "requeued", "REQUEUE_FED": "requeued"}


def add_arguments(parser) -> None:
    parser.add_argument("sweep", help="a sweep file (configs/sweeps/NAME.yaml, or NAME) or a sweep directory "
                                      "(runs/sweeps/NAME)")
    if parser.get_default("action") == "sweep":
        parser.add_argument("overrides", nargs="*", help="a.b=value overrides for every trial, type-checked")
        parser.add_argument("--local", action="store_true",
                            help="run the trials here one after another instead of queueing them on Slurm")


def run(args) -> int:
    try:
        return start(args) if args.action == "sweep" else status(args)
    except (SweepBusy, RunDirBusy) as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return RUN_DIR_BUSY


def start(args) -> int:
    spec = load_sweep(args.sweep).with_overrides(args.overrides)
    book = SweepDir(spec.name)
    if book.exists():
        _require_same_sweep(spec, load_sweep(book.spec_file), book)
    trials = build_trials(spec, book.path)  # every trial validated before anything is written or queued
    if not args.local:
        _require_one_slurm_section(spec, trials)
    with book.lock():
        if not book.exists():
            book.write_spec(spec.to_raw(), " ".join([spec.source, *args.overrides]))
        records = _records(book, trials)
        for record in records:
            refresh(record)
            if args.local and record.job_id is not None and record.state != COMPLETED:
                if not _needs_run(record):
                    raise ConfigError("--local", f"no trial of the sweep on Slurm, but {record.trial} is "
                                                 f"{record.state} (job {record.job_id}); wait for it or cancel it",
                                      source=str(book.path))
                record.job_id = None  # its Slurm job is over: the trial continues here
        book.write(records)
        todo = [r for r in records if _needs_run(r)]
        kept = sum(r.state == COMPLETED for r in records)
        print(f"sweep {spec.name}: {len(records)} trials in {book.path}; {kept} completed, "
              f"{len(records) - kept - len(todo)} queued or running, {len(todo)} to run", flush=True)
        code = 0
        if todo and args.local:
            code = run_trials(todo, lambda: book.write(records))
        elif todo:
            code = _submit(spec, book, todo, trials[0], active=[r for r in records if _on_slurm(r)])
            book.write(records)
    print(table(spec, records, book))
    if args.local and all(r.state == COMPLETED for r in records):
        print(f"next: make compare SWEEP={args.sweep}   # the trials ranked by {spec.metric}, with plots")
    return code


def status(args) -> int:
    spec = load_sweep(args.sweep)
    book = SweepDir(spec.name)
    if not book.exists():
        print(f"sweep-status: {book.path} does not exist: the sweep was never started "
              f"({make_command('sweep', SWEEP=args.sweep)})", file=sys.stderr)
        return INTERNAL
    spec, records = load_sweep(book.spec_file), book.read()
    for record in records:
        refresh(record)
    try:
        with book.lock():
            book.write(records)
    except SweepBusy:
        pass  # `sweep --local` is running the trials and keeps the file up to date itself
    print(table(spec, records, book))
    return 0


def _require_same_sweep(spec: SweepSpec, stored: SweepSpec, book: SweepDir) -> None:
    new, old = spec.to_raw(), stored.to_raw()
    changed = [k for k in sorted(set(new) | set(old)) if new.get(k) != old.get(k)]
    if changed:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(changed[0], f"the sweep as started in {book.spec_file} ({details}); resume it with "
                                      f"`{make_command('sweep', SWEEP=book.path)}`, or give a changed sweep a new name",
                          source=spec.source)


def _require_one_slurm_section(spec: SweepSpec, trials: list[Trial]) -> None:
    first = trials[0].cfg.slurm
    for trial in trials[1:]:
        if trial.cfg.slurm != first:
            key = next(k for k in vars(first) if getattr(first, k) != getattr(trial.cfg.slurm, k))
            raise ConfigError(f"slurm.{key}", f"the same for every trial (one job array has one set of sbatch "
                                              f"options), but trial {trial.id} differs from {trials[0].id}",
                              source=spec.source)


def _records(book: SweepDir, trials: list[Trial]) -> list[TrialRecord]:
    """The trials' records (kept from earlier runs of the sweep); a new trial's config is written into its run
    directory, an old one's is kept: every start of a trial trains what was validated when it first started."""
    existing = {r.trial: r for r in book.read()}
    records = []
    for trial in trials:
        run_dir = Path(trial.cfg.train.run_dir)
        if not (run_dir / TRIAL_CONFIG).is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / TRIAL_CONFIG).write_text(dump_yaml(trial.cfg))
        records.append(existing.get(trial.id) or TrialRecord(trial.id, trial.overrides, str(run_dir)))
    return records


def _needs_run(record: TrialRecord) -> bool:
    """Not completed and not waiting or running on Slurm. (A local trial left "running" by a killed sweep is not
    running: we hold the lock that every sweep command running trials holds.)"""
    if record.state == COMPLETED:
        return False
    return record.job_id is None or record.state == "lost" or record.state.upper() in FINAL_STATES


def _on_slurm(record: TrialRecord) -> bool:
    """Queued or running on Slurm (or its state unknown for now): it counts against `max_concurrent`."""
    return record.job_id is not None and record.state != COMPLETED and not _needs_run(record)


def array_limits(max_concurrent: int, active: list[str]) -> tuple[int, str | None]:
    """(the new array's `%N`, its sbatch dependency) so that at most `max_concurrent` trials of the sweep run at once
    across its arrays: the trials of earlier arrays still queued or running (`active`, their job ids) take their
    share; when they take it all, the new array waits for them to end."""
    if len(active) < max_concurrent:
        return max_concurrent - len(active), None
    return max_concurrent, "afterany:" + ":".join(active)


def refresh(record: TrialRecord) -> None:
    """A Slurm trial's state: completed when its job returned (submitit's result file), else Slurm's state."""
    if record.job_id is None or record.state == COMPLETED:
        return
    try:
        submission = Submission.load(record.run_dir)
    except (OSError, ValueError) as exc:  # damaged: the trial keeps its last known state, and says why
        record.note = str(exc)
        return
    if submission.job_id != record.job_id:
        return
    result = submission.result_path()
    if result.is_file():
        with result.open("rb") as f:
            if pickle.load(f)[0] == "success":
                record.state, record.note = COMPLETED, ""
                return
    job = query(record.job_id)
    if job.state is None:
        if job.reachable:  # the controller forgot it (ended long ago) without a result: resubmitted next time
            record.state, record.note = "lost", job.problem
        else:  # Slurm cannot be asked now: the trial keeps its last known state
            record.note = job.problem
    elif job.final:
        record.state = job.state.lower()
        record.note = f"log: {_relative(submission.log_path())}"
    else:
        record.state = SLURM_WAITING.get(job.state, job.state.lower())
        record.note = f"restarted {job.restarts} time(s)" if job.restarts else ""


def _relative(path: Path) -> Path:
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def _submit(spec: SweepSpec, book: SweepDir, todo: list[TrialRecord], first: Trial,
            active: list[TrialRecord]) -> int:
    """One job array of the trials in `todo` (all share the sweep's slurm section), sharing `max_concurrent` with
    the `active` trials of earlier arrays; records updated in place."""
    slurm, cwd = first.cfg.slurm, Path.cwd()
    folder = (book.path / "slurm").resolve()
    executor = make_executor(slurm, folder=folder, job_name=spec.name, tasks_per_node=max(slurm.gpus_per_node, 1),
                             mounts=[cwd, book.path.resolve()])
    parallelism, dependency = array_limits(spec.max_concurrent, [r.job_id for r in active])
    if dependency:
        extra = executor.parameters.get("additional_parameters", {})
        executor.update_parameters(additional_parameters={**extra, "dependency": dependency})
        print(f"{len(active)} trial(s) of an earlier array still queued or running: the new array starts when "
              f"they end (max_concurrent={spec.max_concurrent})", flush=True)
    elif active:
        print(f"{len(active)} trial(s) of an earlier array still queued or running: the new array runs at most "
              f"{parallelism} at once (max_concurrent={spec.max_concurrent} in all)", flush=True)
    jobs, wandb_ids = [], []
    for record in todo:
        refuse_busy(Path(record.run_dir))  # a trial's directory that another job or trainer uses
        wandb_ids.append(wandb_run_id(Path(record.run_dir)))  # before the job starts: every start logs into one run
        jobs.append(TrainingJob(python_args=["-m", "stereo", "train", str(Path(record.run_dir) / TRIAL_CONFIG),
                                             *record.overrides],  # repeated so that the wandb run is named by them
                                cwd=str(cwd), run_dir=record.run_dir, max_requeues=slurm.max_requeues,
                                save_timeout_s=0.75 * slurm.signal_delay_s))
    try:
        job_ids = submit_array(executor, jobs, parallelism)
    except submitit.core.utils.FailedJobError as exc:
        print(f"sbatch refused the job array: {exc}", file=sys.stderr)
        return INTERNAL
    except RuntimeError as exc:  # submitit: no Slurm here
        print(f"cannot submit: {exc}\n(no Slurm here? `--local` (make sweep LOCAL=1) runs the trials on this "
              "machine; `make slurm-up` starts the local test cluster)", file=sys.stderr)
        return INTERNAL
    submitted_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for record, job_id, wandb_id in zip(todo, job_ids, wandb_ids):
        Submission(job_id=job_id, run_dir=record.run_dir, folder=str(folder), wandb_id=wandb_id,
                   wandb_name=" ".join([first.cfg.name, *record.overrides]), config=spec.config,
                   overrides=[*spec.fixed_overrides(), *record.overrides], submitted_at=submitted_at).save()
        record.job_id, record.state, record.note = job_id, "queued", ""
    array = job_ids[0].split("_")[0]
    print(f"submitted job array {array}: {len(job_ids)} trials, at most {min(parallelism, len(job_ids))} "
          f"at once; logs in {folder}", flush=True)
    return 0


def table(spec: SweepSpec, records: list[TrialRecord], book: SweepDir) -> str:
    """The status table: trial, overrides, state, step, best metric so far."""
    rows = []
    for record in records:
        progress = trial_progress(record.run_dir, spec.metric, spec.direction)
        steps = _configured_steps(Path(record.run_dir))
        best = "-" if progress.best is None else f"{progress.best:.3f} (step {progress.best_step})"
        state = shown_state(record, progress)
        rows.append([record.trial, " ".join(record.overrides), state,
                     f"{progress.step if progress.step is not None else '-'}/{steps}", best])
    header = f"sweep {spec.name}: {len(records)} trials, {spec.metric} ({spec.direction}), " \
             f"at most {spec.max_concurrent} at once ({book.path})\n\n"
    return header + markdown_table(["trial", "overrides", "state", "step", f"best {with_unit(spec.metric)}"], rows)


def _configured_steps(run_dir: Path) -> int | str:
    path = run_dir / TRIAL_CONFIG
    return (yaml.safe_load(path.read_text()) or {}).get("train", {}).get("steps", "?") if path.is_file() else "?"
