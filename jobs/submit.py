"""`python -m stereo submit CONFIG [a.b=value ...]`: validate the config, then queue the training run on Slurm.

The config is loaded (and so validated) before anything touches the queue: a bad one exits 2 with the config error.
The run directory and the wandb id are fixed here, so every requeue resumes the same run in the same wandb run.
"""

from __future__ import annotations

import copy
import secrets
import shlex
import string
import sys
import time
from pathlib import Path

import submitit

from jobs.job import TrainingJob
from jobs.record import Submission
from stereo.config import Config, dump_yaml, load_config
from stereo.config.schema import SlurmConfig

SUBMITTED_CONFIG = "submit_config.yaml"  # the fully resolved config every (re)start of the job trains with
WANDB_ID_FILE = "wandb_id"  # docs/architecture.md: the trainer resumes the wandb run named in this file


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a file under configs/ (name or path)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, type-checked")
    parser.add_argument("--tasks-per-node", type=int, default=None,
                        help="trainer processes per node (default: slurm.gpus_per_node, or 1 without GPUs)")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        submission = submit(cfg, config=args.config, overrides=args.overrides, tasks_per_node=args.tasks_per_node)
    except submitit.core.utils.FailedJobError as exc:  # sbatch refused the job (bad partition, account, ...)
        print(f"sbatch refused the job: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # submitit: no srun here
        print(f"cannot submit: {exc}", file=sys.stderr)
        return 1
    print(f"submitted job {submission.job_id}")
    print(f"run directory: {submission.run_dir}")
    print(f"wandb run: {submission.wandb_name} (id {submission.wandb_id}, project {cfg.logging.project})")
    print(f"log: {submission.log_path()}")
    print("follow with: make status | make logs | make cancel  (RUN=<run directory> for an older run)")
    return 0


def submit(cfg: Config, *, config: str, overrides: list[str], tasks_per_node: int | None = None,
           python_args: list[str] | None = None) -> Submission:
    """Queue `cfg` as one Slurm job and record it. `python_args` replaces the trainer (tests use a stand-in)."""
    cfg = copy.deepcopy(cfg)
    run_dir = _new_run_dir(cfg)
    cfg.train.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / SUBMITTED_CONFIG
    config_path.write_text(dump_yaml(cfg))
    wandb_id = _wandb_id(run_dir)
    folder = Path(cfg.slurm.folder).resolve() / run_dir.name
    cwd = Path.cwd()
    tasks = tasks_per_node or max(cfg.slurm.gpus_per_node, 1)
    executor = make_executor(cfg.slurm, folder=folder, job_name=run_dir.name, tasks_per_node=tasks,
                             mounts=[cwd, run_dir, folder])
    job = executor.submit(TrainingJob(
        python_args=python_args or ["-m", "stereo", "train", str(config_path)],
        cwd=str(cwd), run_dir=str(run_dir), max_requeues=cfg.slurm.max_requeues,
        save_timeout_s=0.75 * cfg.slurm.signal_delay_s,
    ))
    # The trainer names its wandb run after the config it is given (submit_config.yaml carries cfg.name).
    submission = Submission(job_id=str(job.job_id), run_dir=str(run_dir), folder=str(folder), wandb_id=wandb_id,
                            wandb_name=cfg.name, config=config, overrides=list(overrides),
                            submitted_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    submission.save()
    return submission


def make_executor(slurm: SlurmConfig, *, folder: Path, job_name: str, tasks_per_node: int,
                  mounts: list[Path]) -> submitit.SlurmExecutor:
    """The config's slurm section -> a submitit executor (sbatch flags, signal, requeue budget, container)."""
    python, srun_args = container_launch(slurm, mounts=mounts, workdir=mounts[0])
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=slurm.max_requeues, python=python)
    params: dict = dict(job_name=job_name, nodes=slurm.nodes, ntasks_per_node=tasks_per_node,
                        cpus_per_task=slurm.cpus_per_task, time=slurm.time_min,
                        signal_delay_s=slurm.signal_delay_s, stderr_to_stdout=True,
                        # a task that fails ends the step: the other ranks would wait in a collective otherwise
                        srun_args=["--kill-on-bad-exit=1", *srun_args])
    optional = dict(partition=slurm.partition, account=slurm.account, qos=slurm.qos, constraint=slurm.constraint,
                    gpus_per_node=slurm.gpus_per_node or None,
                    mem=f"{slurm.mem_gb}GB" if slurm.mem_gb else None)
    params.update({k: v for k, v in optional.items() if v is not None})
    if slurm.extra_sbatch:
        # `exclusive: ""` in the config becomes a bare `#SBATCH --exclusive`.
        params["additional_parameters"] = {k: (v if v != "" else True) for k, v in slurm.extra_sbatch.items()}
    executor.update_parameters(**params)
    return executor


def container_launch(slurm: SlurmConfig, *, mounts: list[Path], workdir: Path) -> tuple[str | None, list[str]]:
    """(python command, srun arguments) that run the job inside `slurm.container_image`, or (None, []) on the host.

    The checkout, the run directory, submitit's folder and `slurm.container_mounts` are mounted at the same paths
    inside the container."""
    if not slurm.container_image:
        return None, []
    paths = sorted({str(m) for m in mounts} | set(slurm.container_mounts))
    binds = ",".join(f"{p}:{p}" for p in paths)
    if slurm.container_runtime == "pyxis":
        return "python", [f"--container-image={slurm.container_image}", f"--container-mounts={binds}",
                          f"--container-workdir={workdir}"]
    if slurm.container_runtime == "docker":  # docker run per task: signals, user, GPUs in docker/slurm_task.sh
        task = Path(__file__).resolve().parents[1] / "docker" / "slurm_task.sh"
        return shlex.join(["bash", str(task), slurm.container_image, str(workdir), *paths, "--"]), []
    return f"apptainer exec --nv --bind {shlex.quote(binds)} --pwd {shlex.quote(str(workdir))} " \
           f"{shlex.quote(slurm.container_image)} python", []


def _new_run_dir(cfg: Config) -> Path:
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir).resolve()
    base = Path("runs").resolve() / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _wandb_id(run_dir: Path) -> str:
    """Reuse the run's wandb id (a resubmitted run continues its wandb run), else make one in wandb's format."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    wandb_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.write_text(wandb_id + "\n")
    return wandb_id
