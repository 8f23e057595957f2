"""`python -m stereo mlflow-upload RUN_DIR [--tracking-uri URI]`: a run's metrics, pictures and config to MLflow.

For a run whose MLflow server was unreachable (the trainer warned once and went on; metrics.jsonl has everything),
or one that logged to its embedded RUN_DIR/mlflow.db and should now be on a shared server. It continues the MLflow
run this run directory already has on that tracking URI (RUN_DIR/mlflow_runs.json), or starts one; values already
there are not sent again, so running it twice sends nothing the second time.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from stereo import exitcodes

PICTURE = re.compile(r"^(?P<name>.+)_(?P<step>\d{8})\.png$")  # RunLogger.log_image's file names


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory (with config.yaml and metrics.jsonl)")
    parser.add_argument("--tracking-uri", default=None,
                        help="where to (http://host:5000, a database URI); default: the run's "
                             "logging.mlflow_tracking_uri, else MLFLOW_TRACKING_URI, else RUN_DIR/mlflow.db")


def run(args) -> int:
    config = args.run_dir / "config.yaml"
    if not config.is_file():
        print(f"mlflow-upload: {config} not found: expected a run directory that a training run wrote",
              file=sys.stderr)
        return exitcodes.CONFIG
    from stereo.config import load_config
    from stereo.train.checkpoint import complete_steps
    from stereo.train.trackers import MlflowTracker, metrics_records

    cfg = load_config(config)
    if args.tracking_uri:
        cfg.logging.mlflow_tracking_uri = args.tracking_uri
    tracker = MlflowTracker(args.run_dir, cfg, [], None, training=False)
    records = metrics_records(args.run_dir)
    sent = tracker.catch_up(records)
    pictures = sorted((args.run_dir / "images").glob("*.png"))
    for path in pictures:
        match = PICTURE.match(path.name)
        tracker.log_image(int(match["step"]) if match else 0, match["name"] if match else path.stem, path)
    steps = complete_steps(args.run_dir / "checkpoints")
    if steps and steps[-1] >= cfg.train.steps:
        tracker.finish(exitcodes.OK)
    print(f"{tracker.uri}: MLflow run {tracker.run_id} (experiment {cfg.logging.project}): {sent} metric values "
          f"sent from {len(records)} lines of metrics.jsonl, {len(pictures)} pictures, config.yaml", file=sys.stderr)
    return exitcodes.OK
