"""The run logger: metrics.jsonl stays complete and strict JSON whatever wandb does (its service killed by Slurm's
SIGTERM, no network at start), and WANDB_MODE from the environment wins.

Runs in a child process: wandb leaves the address of its service in the environment of the process that started
it, and processes started later by other tests would inherit the address of the service killed here."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import psutil
    from stereo.config import load_config
    from stereo.train.logging import RunLogger

    logger = RunLogger(sys.argv[1], load_config("tiny", ["logging.wandb=offline"]), [], None, rank=0)
    assert logger.wandb_run is not None
    logger.log(1, {"loss": 1.0})
    services = [p for p in psutil.Process().children(recursive=True) if "wandb" in " ".join(p.cmdline())]
    assert services, "expected wandb's service process"
    for proc in services:
        os.kill(proc.pid, signal.SIGTERM)
    psutil.wait_procs(services, timeout=10)
    for step in (2, 3):
        logger.log(step, {"loss": float(step)})
    logger.finish()
    print("wandb off:", logger.wandb_run is None)
""")


def test_wandb_service_killed_mid_run_does_not_stop_logging(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={"WANDB_SILENT": "true", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb off: True" in proc.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


MODES = textwrap.dedent("""
    import json, os, sys, time
    from stereo.config import load_config
    from stereo.train.logging import RunLogger

    run_dir, overrides = sys.argv[1], sys.argv[2:]
    started = time.monotonic()
    logger = RunLogger(run_dir, load_config("tiny", overrides), [], None, rank=0)
    print(f"start-up: {time.monotonic() - started:.2f} s")
    logger.log(1, {"loss": 1.0, "grad_norm": float("nan")})
    mode = logger.wandb_run.settings.mode if logger.wandb_run is not None else None
    logger.finish()
    print("mode:", mode)
""")


def run_logger(run_dir, overrides, env):
    base = {"WANDB_SILENT": "true", "PATH": "/usr/bin:/bin", "HOME": str(run_dir)}
    return subprocess.run([sys.executable, "-c", MODES, str(run_dir), *overrides], capture_output=True, text=True,
                          timeout=180, env={**base, **env})


def test_wandb_mode_from_the_environment_wins_over_an_api_key(tmp_path):
    done = run_logger(tmp_path, ["logging.wandb=auto"], {"WANDB_API_KEY": "0" * 40, "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mode: offline" in done.stdout
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_wandb_that_cannot_start_is_a_warning_and_metrics_stay_strict_json(tmp_path):
    done = run_logger(tmp_path, ["logging.wandb=online", "logging.wandb_init_timeout_s=5"],
                      {"WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"})  # nothing listens there
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mode: None" in done.stdout
    assert "warning: wandb did not start" in done.stderr
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))["grad_norm"] is None


IMAGE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from stereo.config import load_config
    from stereo.pictures import disparity_panel
    from stereo.train.logging import RunLogger

    logger = RunLogger(sys.argv[1], load_config("tiny", ["logging.wandb=offline"]), [], None, rank=0)
    gt = np.tile(np.linspace(1, 30, 64, dtype=np.float32), (32, 1))
    logger.log_image(7, "val/disparity_0", disparity_panel(np.zeros((32, 64, 3), np.uint8), gt, gt, gt > 0))
    logger.finish()
""")


def test_validation_panels_reach_wandb(tmp_path):
    """The trainer's Validator logs its labelled panels through log_image: a file in the run and a wandb image."""
    proc = subprocess.run([sys.executable, "-c", IMAGE_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env={"WANDB_SILENT": "true", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "images/val_disparity_0_00000007.png").is_file()
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/val/disparity_0_*.png"))


def test_wandb_init_timeout_bounds_the_whole_start(tmp_path):
    """A server that accepts and never answers (no network): wandb's own init_timeout left out its service's start
    and first requests, 14 s at 5 (issue 22); logging.wandb_init_timeout_s bounds the whole wait."""
    import re
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # connections complete in the kernel; nothing is ever read or answered
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        done = run_logger(tmp_path, ["logging.wandb=online", "logging.wandb_init_timeout_s=3"],
                          {"WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": url})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mode: None" in done.stdout
    assert "wandb did not start (TimeoutError: not started within logging.wandb_init_timeout_s=3 s)" in done.stderr
    assert 3.0 <= float(re.search(r"start-up: ([\d.]+) s", done.stdout).group(1)) < 3.8
