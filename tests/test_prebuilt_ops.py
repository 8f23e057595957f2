"""Nothing compiles when training starts. `make setup` (docker/install.sh) compiles DeepSpeed's CPU comm op into the
venv's DeepSpeed, so another checkout reaching the same venv by another path (a `.venv` symlink, as in a worktree)
trains at once; it used to JIT-build the op for minutes into a cache keyed by that path. Other ops a job may
JIT-build go to VENV/torch_extensions unless TORCH_EXTENSIONS_DIR says otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from stereo.train.engine import sanitise_cuda_arch_list

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["train.steps=2", "augment.crop=[64,128]", "data.batch_size=1", "model.train_iters=2", "data.val=[]",
         "data.num_workers=0", "logging.wandb=disabled", "logging.every=1", "checkpoint.every=2",
         "deepspeed.zero_stage=0"]


def test_a_second_checkout_trains_without_compiling(tmp_path):
    if not (ROOT / "shards/demo/train/manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "stereo", "demo-data", "--out", "shards/demo"], cwd=ROOT, check=True)
    clone = tmp_path / "clone"
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "shards", "wandb",
                                                               "__pycache__", ".pytest_cache"))
    (clone / "shards").symlink_to(ROOT / "shards")
    (clone / ".venv").symlink_to(Path(sys.prefix).resolve())
    jit = tmp_path / "torch_extensions"  # where a JIT build would land
    # CXX=/bin/false: a compile would fail the run, not just cost time.
    env = {**os.environ, "PYTHONPATH": str(clone), "TORCH_EXTENSIONS_DIR": str(jit), "CXX": "/bin/false"}
    start = time.monotonic()
    done = subprocess.run([str(clone / ".venv/bin/python"), "-m", "stereo", "train", "tiny",
                           f"train.run_dir={tmp_path / 'run'}", *STEPS], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{output[-4000:]}\n(a venv from before this change needs `make setup` again)"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert "deepspeed_shm_comm_op built successfully" in done.stdout  # DeepSpeed loaded the op: it is in use
    assert not jit.exists() and "Building extension" not in output
    print(f"second checkout: 2 steps in {time.monotonic() - start:.0f} s, nothing compiled")


def test_jit_built_ops_go_to_the_venv_unless_you_say_otherwise(monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")  # restored afterwards
    sanitise_cuda_arch_list()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == os.path.join(sys.prefix, "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/yours")
    sanitise_cuda_arch_list()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/yours"
