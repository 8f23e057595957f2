"""The first commands a new user types: config errors before torchrun, misplaced overrides, a fresh clone without
.venv, and eval/infer/export without their arguments. Each must fail at once with one clear line."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stereo.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}


def make(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["make", *args], cwd=cwd, capture_output=True, text=True, env=MAKE_ENV, timeout=120)


@pytest.mark.parametrize("override, hint", [
    ("steps=10", "train.steps=10"),
    ("lr=1e-4", "optim.lr=1e-4"),
    ("batch_size=4", "data.batch_size=4"),
    ("every=5", "checkpoint.every=5 or logging.every=5"),
    ("model.depth_anything=x.pth", "model.pretrained.depth_anything=x.pth"),
    ("optim.lrr=1e-4", "optim.lr=1e-4"),
])
def test_a_misplaced_override_names_the_whole_assignment(override, hint):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    assert str(info.value).endswith(f"unknown key; did you mean {hint}?")


@pytest.mark.parametrize("args, message", [
    (["optim.lrr=1e-4"], "config error: configs/tiny.yaml + overrides optim.lrr=1e-4: optim.lrr: unknown key; "
                         "did you mean optim.lr=1e-4?"),
    (["steps=10"], "config error: configs/tiny.yaml + overrides steps=10: steps: unknown key; "
                   "did you mean train.steps=10?"),
    (["CONFIG=tiyn"], "did you mean tiny?"),
])
def test_make_train_config_error_shows_alone_before_torchrun(args, message):
    runs_before = set((REPO / "runs").glob("*")) if (REPO / "runs").is_dir() else set()
    proc = make("train", *args)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("config error: ") and message in lines[0], proc.stderr
    assert lines[1].startswith("make: *** [") and lines[1].endswith("train] Error 2")  # make's own note
    assert proc.stdout == ""  # torchrun never started (make echoes its command line)
    assert (set((REPO / "runs").glob("*")) if (REPO / "runs").is_dir() else set()) == runs_before


def test_config_check_prints_nothing_and_only_validates():
    ok = subprocess.run([sys.executable, "-m", "stereo", "config", "--check", "tiny", "train.steps=9"], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == "" and ok.stderr == ""
    bad = subprocess.run([sys.executable, "-m", "stereo", "config", "--check", "tiny", "steps=9"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean train.steps=9?" in bad.stderr
    # it must stay cheap: the config package alone, not torch (make train runs it before every launch)
    probe = "import sys; from stereo.cli import main; main(['config', '--check', 'tiny']); print('torch' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert imported.stdout.strip() == "False", imported.stderr


def test_make_keeps_upper_case_variables_and_dotted_overrides_apart():
    proc = make("-s", "config", "CONFIG=tiny", "NPROC=2", "train.steps=9")
    assert proc.returncode == 0, proc.stderr
    assert "steps: 9" in proc.stdout


@pytest.mark.parametrize("target, args, missing, example", [
    ("eval", [], "CKPT BENCH", "make eval CKPT=runs/demo BENCH=demo"),  # DATA only once BENCH says it needs one
    ("eval", ["BENCH=demo"], "CKPT", "make eval CKPT=runs/demo BENCH=demo"),
    ("eval", ["CKPT=runs/x", "BENCH=kitti15"], "DATA", "DATA=/data/KITTI"),
    ("infer", ["CKPT=runs/x"], "LEFT RIGHT OUT", "LEFT=shards/demo/motorcycle/left.png"),
    ("export", [], "RUN OUT", "make export RUN=runs/demo OUT=runs/demo/model.pth"),
    ("mlflow-upload", [], "RUN", "make mlflow-upload RUN=runs/demo"),
])
def test_missing_arguments_fail_in_make_before_python(target, args, missing, example):
    proc = make(target, *args)
    assert proc.returncode == 2
    assert proc.stdout == ""  # no recipe line ran: Python never started
    (line,) = proc.stderr.splitlines()
    assert f"*** make {target} needs {missing}, for example: " in line and example in line


def test_fresh_clone_without_venv_says_run_make_setup(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    proc = make("train", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.endswith(".venv/bin/python not found: run `make setup` first.  Stop.")
    assert make("help", cwd=tmp_path).returncode == 0  # targets without Python still work


def test_make_resume_continues_the_named_or_the_newest_run(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for name in ("older", "newer"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "config.yaml").write_text("name: tiny\n")
        os.utime(tmp_path / "runs" / name / "config.yaml", (1e9, 1e9 if name == "older" else 2e9))
    python = f"PY={sys.executable}"

    def command(*args: str) -> str:  # the recipe line, its continuation joined
        return " ".join(make("-n", "resume", python, *args, cwd=tmp_path).stdout.replace("\\\n", " ").split())

    assert f"{sys.executable} -m stereo train 'runs/newer/config.yaml' 'train.run_dir=runs/newer'" in command()
    assert "'runs/older/config.yaml' 'train.run_dir=runs/older' 'train.steps=20'" in command("RUN=runs/older",
                                                                                          "train.steps=20")
    shutil.rmtree(tmp_path / "runs")
    none = make("resume", python, cwd=tmp_path)
    assert none.returncode == 2 and "no run directory in runs/" in none.stderr
