"""The run logger keeps metrics.jsonl complete when wandb's service dies (Slurm's SIGTERM reaches it too)."""

import json
import os
import signal
import time

import psutil

from stereo.config import load_config
from stereo.train.logging import RunLogger


def test_wandb_service_killed_mid_run_does_not_stop_logging(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config("tiny", ["logging.wandb=offline"])
    logger = RunLogger(tmp_path, cfg, [], None, rank=0)
    assert logger.wandb_run is not None
    logger.log(1, {"loss": 1.0})
    services = [p for p in psutil.Process().children(recursive=True) if "wandb" in " ".join(p.cmdline())]
    assert services, "expected wandb's service process"
    for proc in services:
        os.kill(proc.pid, signal.SIGTERM)
    psutil.wait_procs(services, timeout=10)
    time.sleep(0.5)
    for step in (2, 3):
        logger.log(step, {"loss": float(step)})
    logger.finish()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert logger.wandb_run is None
