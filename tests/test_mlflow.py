"""MLflow beside wandb, against a real `mlflow server` (SQLite backend) on loopback: a run killed with -9 and
restarted is one MLflow run with every step once, its params, tags and artifacts (config.yaml, the training and
validation pictures, the export); a server that cannot be reached or dies mid-run costs one warning, and `mlflow-upload`
sends what it missed. The embedded default (RUN_DIR/mlflow.db) is covered by test_embedded_store_needs_no_server.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port
from stereo.train.checkpoint import find_checkpoint
from test_train import FAST, finish, kill_tree, launch, metrics, wait_for_step

pytestmark = pytest.mark.usefixtures("demo_shards")
QUIET = {"WANDB_SILENT": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts")],
                            cwd=root, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **QUIET},
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"mlflow server did not answer in 120 s: {(root / 'server.log').read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """The server and its uvicorn workers (one process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, uri = start_server(tmp_path_factory.mktemp("mlflow_server"))
    yield uri
    stop_server(proc)


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def the_run(uri: str, run_dir: Path, experiment: str = "foundation-stereo"):
    """The one MLflow run of the experiment, checked against the id the run directory keeps for this URI."""
    mlflow = client(uri)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    assert json.loads((run_dir / "mlflow_runs.json").read_text())[uri] == runs[0].info.run_id
    return runs[0]


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def resumed(server, tmp_path_factory):
    """A run with wandb offline and MLflow on the server, killed with -9 during step 6 (after the checkpoint at
    step 3; MLflow has steps 4-5 already) and restarted on the same directory."""
    run_dir = tmp_path_factory.mktemp("mlflow_run") / "run"
    overrides = ("logging.wandb=offline", "logging.mlflow=true")
    env = {**QUIET, "MLFLOW_TRACKING_URI": server, "SLURM_JOB_ID": "4242"}
    first = launch(run_dir, 1, overrides, env)
    wait_for_step(run_dir, 5, first)
    kill_tree(first)
    code, log = finish(launch(run_dir, 1, overrides, env), run_dir)
    assert code == 0, log[-3000:]
    return run_dir, log


def test_a_killed_and_restarted_run_is_one_mlflow_run_with_every_step_once(server, resumed):
    run_dir, log = resumed
    assert "did not start" not in log and "unavailable" not in log, log[-3000:]
    run = the_run(server, run_dir)
    assert run.info.status == "FINISHED"
    in_file = {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}
    assert history(server, run.info.run_id, "loss") == sorted(in_file.items())  # steps 1-8, once, the same values
    assert [step for step, _ in history(server, run.info.run_id, "startup/total_s")] == [1, 4]  # each start's
    assert sorted(in_file) == list(range(1, 9))
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # both trackers: wandb's two starts, one id


def test_params_tags_and_artifacts(server, resumed):
    run_dir, _ = resumed
    run = the_run(server, run_dir)
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["model.size"] == "tiny"
    assert run.data.params["augment.crop"] == "[64, 128]"
    saved = torch.load(find_checkpoint(run_dir) / "trainer_state_rank0.pt", map_location="cpu", weights_only=False)
    assert len(saved["git_revision"]) == 40 and run.data.tags["git_revision"] == saved["git_revision"]
    assert run.data.tags["slurm_job_id"] == "4242" and run.data.tags["world_size"] == "1"
    mlflow = client(server)
    assert "config.yaml" in [a.path for a in mlflow.list_artifacts(run.info.run_id)]
    pictures = [a.path for a in mlflow.list_artifacts(run.info.run_id, "images")]  # validation's: the tests below
    assert pictures == ["images/train_disparity_00000004.png", "images/train_disparity_00000008.png"]


def test_export_is_attached_to_the_mlflow_run(server, resumed, tmp_path):
    run_dir, _ = resumed
    done = subprocess.run([sys.executable, "-m", "stereo", "export", str(run_dir), "--out", str(tmp_path / "model.pth"),
                           "--ema", "--mlflow"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": server})
    assert done.returncode == 0, done.stderr[-3000:]
    run = the_run(server, run_dir)
    exported = {a.path for a in client(server).list_artifacts(run.info.run_id, "export")}
    assert {"export/model.pth", "export/cfg.yaml", "export/model.safetensors"} <= exported


LOGGER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from stereo.config import dump_yaml, load_config
    from stereo.train.logging import RunLogger

    run_dir, kill_after = sys.argv[1], int(sys.argv[2])
    cfg = load_config("tiny", ["logging.wandb=disabled", "logging.mlflow=true", *sys.argv[3:]])
    open(f"{run_dir}/config.yaml", "w").write(dump_yaml(cfg))
    logger = RunLogger(run_dir, cfg, [], None, rank=0)
    logger.truncate_after(-1)
    for step in range(1, 5):
        if step == kill_after:
            open(f"{run_dir}/kill", "w").close()
            while open(f"{run_dir}/kill").read() != "killed":
                time.sleep(0.05)
        logger.log(step, {"loss": 1.0 / step, "grad_norm": float("nan")})
    logger.log_image(4, "val/disparity_0", np.zeros((8, 16, 3), np.uint8))
    logger.finish(0)
    print("trackers left:", len(logger.trackers))
""")


def log_steps(run_dir: Path, overrides: list[str], kill=None, kill_after: int = 0) -> subprocess.CompletedProcess:
    """Steps 1-4 and a picture through RunLogger; with `kill`, that is called before step `kill_after`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", LOGGER, str(run_dir), str(kill_after), *overrides], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **QUIET})
    if kill is not None:
        deadline = time.time() + 120
        while not (run_dir / "kill").is_file():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        kill()
        (run_dir / "kill").write_text("killed")
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning" in line.lower()]


def test_unreachable_server_is_one_warning(tmp_path):
    start = time.time()
    done = log_steps(tmp_path, [f"logging.mlflow_tracking_uri=http://127.0.0.1:{free_port()}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(warnings(done.stderr)) == 1 and "mlflow did not start" in done.stderr, done.stderr[-3000:]
    assert time.time() - start < 90  # bounded retries: not MLflow's default minutes of backoff
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_server_dying_mid_run_is_one_warning_and_upload_sends_the_rest(server, tmp_path):
    doomed, doomed_uri = start_server(tmp_path / "doomed")
    run_dir = tmp_path / "run"
    done = log_steps(run_dir, [f"logging.mlflow_tracking_uri={doomed_uri}", "logging.project=uploads"],
                     lambda: stop_server(doomed), 3)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(warnings(done.stderr)) == 1 and "mlflow unavailable" in done.stderr, done.stderr[-3000:]
    assert "trackers left: 0" in done.stdout
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    upload = [sys.executable, "-m", "stereo", "mlflow-upload", str(run_dir), "--tracking-uri", server]
    sent = subprocess.run(upload, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert sent.returncode == 0, sent.stderr[-3000:]
    assert "8 metric values sent from 4 lines" in sent.stderr
    run = the_run(server, run_dir, experiment="uploads")
    assert history(server, run.info.run_id, "loss") == [(s, 1.0 / s) for s in range(1, 5)]
    nan_steps = [(m.step, m.value != m.value) for m in client(server).get_metric_history(run.info.run_id, "grad_norm")]
    assert sorted(nan_steps) == [(s, True) for s in range(1, 5)]  # null in metrics.jsonl: NaN, as the trainer sent it
    pictures = [a.path for a in client(server).list_artifacts(run.info.run_id, "images")]
    assert pictures == ["images/val_disparity_0_00000004.png"]
    again = subprocess.run(upload, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 metric values sent" in again.stderr, again.stderr[-3000:]
    assert history(server, run.info.run_id, "loss") == [(s, 1.0 / s) for s in range(1, 5)]


def test_embedded_store_needs_no_server(tmp_path):
    done = log_steps(tmp_path, [])
    assert done.returncode == 0 and not warnings(done.stderr), done.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = the_run(uri, tmp_path)
    assert history(uri, run.info.run_id, "loss") == [(s, 1.0 / s) for s in range(1, 5)]
    assert (tmp_path / "mlartifacts" / run.info.run_id / "artifacts/images/val_disparity_0_00000004.png").is_file()
