"""The experiment trackers that mirror RUN_DIR/metrics.jsonl: wandb and MLflow (`logging.wandb`, `logging.mlflow`).

Both keep one interface (`log`, `log_image`, `catch_up` with what metrics.jsonl holds, `finish`, and `name` for
the warning when one fails) and one run per run directory across every requeue and resume: wandb's id lives in
RUN_DIR/wandb_id, MLflow's run id in RUN_DIR/mlflow_runs.json (one id per tracking URI, so a run uploaded later to
a server gets its own). The trainer
(stereo.train.logging.RunLogger) starts them, and drops one at its first failure: they never stop a run.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from stereo.config import Config, to_dict
from stereo.config.load import flatten
from stereo.train.run_files import wandb_run_id

MLFLOW_RUNS_FILE = "mlflow_runs.json"
MLFLOW_DB = "mlflow.db"  # the embedded default: a SQLite file in the run directory, artifacts beside it
MLFLOW_ARTIFACTS = "mlartifacts"
PARAM_MAX_CHARS = 6000  # MLflow's limit on a param value
LOG_BATCH_METRICS = 1000  # MLflow's limit on metrics in one log_batch call
LOG_BATCH_PARAMS = 100


def wandb_mode(setting: str) -> str:
    """WANDB_MODE set by the user wins; `auto` is online with an API key and offline without."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if setting == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return setting


def run_name(cfg: Config, overrides: list[str]) -> str:
    return " ".join([cfg.name, *overrides]) or cfg.name



def within(timeout_s: float, key: str, start):
    """`start()`'s result, or TimeoutError after `timeout_s` (0: no limit). wandb's own init_timeout leaves out its
    service's start and its first requests: without a network it waited 14 s at 5. A start given up on goes on in
    the background and its run, if it ever comes, is closed there."""
    outcome: dict = {}
    given_up = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = start()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc
        if given_up.is_set() and outcome.get("value") is not None:
            with contextlib.suppress(Exception):
                outcome["value"].finish(quiet=True)

    thread = threading.Thread(target=run, daemon=True, name=f"within {key}")
    thread.start()
    thread.join(timeout_s or None)
    if thread.is_alive():
        given_up.set()
        raise TimeoutError(f"not started within {key}={timeout_s} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir: Path, cfg: Config, overrides: list[str], git_revision: str | None):
        import wandb

        run_id = wandb_run_id(run_dir)
        tags = list(cfg.logging.tags) + [f"config:{cfg.name}"] + ([f"git:{git_revision[:10]}"] if git_revision else [])
        # quiet: wandb's 30-line "Run history / Run summary" would otherwise sit between the validation result and
        # the run's closing lines; the same numbers are in metrics.jsonl and on the wandb page
        self.run = within(cfg.logging.wandb_init_timeout_s, "logging.wandb_init_timeout_s", lambda: wandb.init(
            project=cfg.logging.project, entity=cfg.logging.entity, group=cfg.logging.group or cfg.name,
            name=run_name(cfg, overrides), tags=tags, config=to_dict(cfg), id=run_id, resume="allow",
            dir=str(run_dir), mode=wandb_mode(cfg.logging.wandb), notes=f"git {git_revision}" if git_revision else None,
            settings=wandb.Settings(init_timeout=cfg.logging.wandb_init_timeout_s, quiet=True)))

    def log(self, step: int, scalars: dict[str, float], timestamp: float) -> None:
        self.run.log(scalars, step=step)

    def catch_up(self, records: list[tuple[int, dict, float]]) -> None:
        """Nothing: wandb takes steps in order only (an offline run's own files keep what it was given)."""

    def log_image(self, step: int, name: str, path: Path) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path))}, step=step)

    def finish(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


def embedded_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / MLFLOW_DB).resolve()}"


def mlflow_tracking_uri(run_dir: Path, setting: str | None) -> str:
    """logging.mlflow_tracking_uri, else MLFLOW_TRACKING_URI, else the SQLite file in the run directory (MLflow 3
    refuses its plain-file backend unless told otherwise: "maintenance mode")."""
    return setting or os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri(run_dir)


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow params: `optim.lr` -> "0.001"; lists and None as JSON."""
    return {key: (value if isinstance(value, str) else json.dumps(value))[:PARAM_MAX_CHARS]
            for key, value in flatten(to_dict(cfg)).items()}


class MlflowTracker:
    """One MLflow run per run directory. A resumed run continues the metric history: a (metric, step) already in
    the MLflow run is not sent again, so the steps replayed after a resume appear once (with their first values)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, cfg: Config, overrides: list[str], git_revision: str | None,
                 training: bool = True):
        from mlflow import MlflowClient
        from mlflow.entities import RunTag

        bound_mlflow_requests(cfg.logging.mlflow_timeout_s)

        self.run_dir = Path(run_dir)
        self.uri = mlflow_tracking_uri(self.run_dir, cfg.logging.mlflow_tracking_uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        ids = self._stored_ids()
        run = self._existing_run(ids.get(self.uri))
        if run is None:
            run = self.client.create_run(self._experiment_id(cfg.logging.project), run_name=run_name(cfg, overrides))
            self._store_id(run.info.run_id)
        elif training:
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        self.logged: dict[str, set[int]] = {key: {m.step for m in self.client.get_metric_history(self.run_id, key)}
                                            for key in run.data.metrics}
        self._log_params(run.data.params, flat_params(cfg))
        tags = {"config": cfg.name, **{t: "" for t in cfg.logging.tags}}
        if training:  # this start's; an upload or an export leaves the trainer's as they are
            tags["world_size"] = os.environ.get("WORLD_SIZE", "1")
            if git_revision:
                tags |= {"git_revision": git_revision, "mlflow.source.git.commit": git_revision}
            if os.environ.get("SLURM_JOB_ID"):
                tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        self.client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in tags.items()])
        if (self.run_dir / "config.yaml").is_file():
            self.client.log_artifact(self.run_id, str(self.run_dir / "config.yaml"))
        if training:
            print(f"mlflow: run {self.run_id} of experiment {cfg.logging.project} at {self.uri}", file=sys.stderr,
                  flush=True)

    def _stored_ids(self) -> dict[str, str]:
        path = self.run_dir / MLFLOW_RUNS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _store_id(self, run_id: str) -> None:
        path = self.run_dir / MLFLOW_RUNS_FILE
        path.write_text(json.dumps(self._stored_ids() | {self.uri: run_id}, indent=1) + "\n")

    def _existing_run(self, run_id: str | None):
        from mlflow.exceptions import MlflowException

        if run_id is None:
            return None
        try:
            return self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None  # the store was emptied or replaced: a new run, its id recorded in place of the old one

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        embedded = self.uri == embedded_uri(self.run_dir)  # else the server's or the database's artifact root
        location = (self.run_dir / MLFLOW_ARTIFACTS).resolve().as_uri() if embedded else None
        return self.client.create_experiment(name, artifact_location=location)

    def _log_params(self, stored: dict[str, str], params: dict[str, str]) -> None:
        """Params are write-once in MLflow: a key changed since the first start (an allowed config change on resume)
        keeps its first value as the param and gets a `changed.<key>` tag with the current one."""
        from mlflow.entities import Param

        new = [Param(k, v) for k, v in params.items() if k not in stored]
        for i in range(0, len(new), LOG_BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=new[i:i + LOG_BATCH_PARAMS])
        for key, value in params.items():
            if key in stored and stored[key] != value:
                self.client.set_tag(self.run_id, f"changed.{key}", value)

    def log(self, step: int, scalars: dict[str, float], timestamp: float) -> None:
        self.catch_up([(step, scalars, timestamp)])

    def catch_up(self, records: list[tuple[int, dict, float]]) -> int:
        """The metrics of these (step, scalars, time) records that the MLflow run lacks, in batches; None (a
        non-finite value in metrics.jsonl) is sent as NaN. Returns how many were sent."""
        from mlflow.entities import Metric

        metrics = []
        for step, scalars, timestamp in records:
            for key, value in scalars.items():
                number = value is None or isinstance(value, (int, float))
                if number and step not in self.logged.setdefault(key, set()):
                    metrics.append(Metric(key, float("nan") if value is None else float(value), int(timestamp * 1000),
                                          step))
                    self.logged[key].add(step)
        for i in range(0, len(metrics), LOG_BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + LOG_BATCH_METRICS])
        return len(metrics)

    def log_image(self, step: int, name: str, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), "images")

    def log_files(self, paths: list[Path], folder: str) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self, exit_code: int) -> None:
        from stereo import exitcodes

        status = "FINISHED" if exit_code == exitcodes.OK else "KILLED" if exit_code == exitcodes.PREEMPTED else "FAILED"
        with contextlib.redirect_stdout(io.StringIO()):  # its "View run ... at" lines: the start names the run
            self.client.set_terminated(self.run_id, status)


def bound_mlflow_requests(timeout_s: int) -> None:
    """MLflow's HTTP client retries 7 times with doubling pauses (minutes against a dead server); a mirror gets a
    few seconds. Variables the user set win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    for name in ("mlflow", "alembic"):  # "creating initial database tables" and the like on every start
        logging.getLogger(name).setLevel(logging.WARNING)


def metrics_records(run_dir: Path) -> list[tuple[int, dict, float]]:
    """RUN_DIR/metrics.jsonl as (step, scalars, time); event lines (config changes, early stops) left out."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line) if line.strip() else {"event": "blank"}
        if "event" not in record:
            scalars = {k: v for k, v in record.items() if k not in ("step", "time")}
            records.append((record["step"], scalars, record.get("time", time.time())))
    return records
