"""`python -m stereo submit CONFIG [a.b=value ...]`: validate the config, then queue the training run on Slurm.

Before anything is written or queued: the config is loaded (and so validated), the paths it names are checked
(shard sources, weights, run directory, container image; `--no-check-paths` skips the files that only the compute
nodes see), and Slurm must answer. A bad config or path exits 2 naming the key and the path; no Slurm exits 1 with
how to reach one. The run directory and the wandb id are fixed here, so every requeue resumes the same run in the
same wandb run.
"""

from __future__ import annotations

import copy
import shlex
import shutil
import sys
import time
import uuid
from pathlib import Path

import submitit

from jobs.job import TrainingJob
from jobs.record import RECORD_NAME, Submission
from jobs.state import query, slurm_hint, slurm_problem
from stereo import exitcodes
from stereo.config import Config, dump_yaml, load_config
from stereo.train.paths import path_problems, problems_error, unwritable
from stereo.config.schema import SlurmConfig
from stereo.plan import GPUS, check_fits
from stereo.progress import make_command
from stereo.train.failures import RunDirBusy
from stereo.train.rundir import LOCK_FILE, live_holder
from stereo.train.run_files import wandb_run_id

SUBMITTED_CONFIG = "submit_config.yaml"  # the fully resolved config every (re)start of the job trains with


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a file under configs/ (name or path)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, type-checked")
    parser.add_argument("--tasks-per-node", type=int, default=None,
                        help="trainer processes per node (default: slurm.gpus_per_node, or 1 without GPUs)")
    parser.add_argument("--no-check-paths", action="store_true",
                        help="do not check shard sources, weights and the container image here (for clusters that "
                             "mount the data on the compute nodes only); the run directory is still checked")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.no_check_paths:
        problem = unwritable(_new_run_dir(cfg))
        problems = [("train.run_dir", problem)] if problem else []
    else:
        problems = path_problems(cfg) + container_problems(cfg.slurm)
    if problems:
        raise problems_error(problems)  # exit 2 (stereo/cli.py)
    if cfg.slurm.gpus_per_node:  # refuse (exit 2) a config whose planned peak memory exceeds slurm.gpu's
        check_fits(cfg, cfg.slurm.nodes * (args.tasks_per_node or cfg.slurm.gpus_per_node), GPUS[cfg.slurm.gpu])
    unreachable = slurm_problem()
    if unreachable:
        hint = slurm_hint()
        print(f"submit: cannot reach Slurm ({unreachable}); nothing was queued or written.\n"
              f"{hint[0].upper()}{hint[1:]}", file=sys.stderr)
        return 1
    try:
        submission = submit(cfg, config=args.config, overrides=args.overrides, tasks_per_node=args.tasks_per_node)
    except RunDirBusy as exc:
        print(f"submit: {exc}", file=sys.stderr)
        return exitcodes.RUN_DIR_BUSY
    except submitit.core.utils.FailedJobError as exc:  # sbatch refused the job (bad partition, account, ...)
        print(f"sbatch refused the job; nothing was queued: {_last_line(str(exc))}", file=sys.stderr)
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
    refuse_busy(run_dir)
    cfg.train.run_dir = str(run_dir)
    folder = Path(cfg.slurm.folder).resolve() / run_dir.name
    created = [path for path in (run_dir, folder) if not path.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir / SUBMITTED_CONFIG
        config_path.write_text(dump_yaml(cfg))
        wandb_id = wandb_run_id(run_dir)
        cwd = Path.cwd()
        tasks = tasks_per_node or max(cfg.slurm.gpus_per_node, 1)
        executor = make_executor(cfg.slurm, folder=folder, job_name=run_dir.name, tasks_per_node=tasks,
                                 mounts=[cwd, run_dir, folder])
        job = executor.submit(TrainingJob(
            python_args=python_args or ["-m", "stereo", "train", str(config_path)],
            cwd=str(cwd), run_dir=str(run_dir), max_requeues=cfg.slurm.max_requeues,
            save_timeout_s=0.75 * cfg.slurm.signal_delay_s,
        ))
    except BaseException:
        for path in created:  # a refused submission leaves nothing behind (a resubmitted run keeps its files)
            shutil.rmtree(path, ignore_errors=True)
        raise
    # The trainer names its wandb run after the config it is given (submit_config.yaml carries cfg.name).
    submission = Submission(job_id=str(job.job_id), run_dir=str(run_dir), folder=str(folder), wandb_id=wandb_id,
                            wandb_name=cfg.name, config=config, overrides=list(overrides),
                            submitted_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    submission.save()
    return submission


def refuse_busy(run_dir: Path) -> None:
    """Raise RunDirBusy, before anything is queued or written, when the run directory is in use: by the job its
    slurm_job.json names (queued, running or requeued; or Slurm cannot say), or by a live trainer holding its lock.
    (A second job used to queue, overwrite that record and then stop with exit 6, hiding the running job from
    `make status` and `make cancel`.)"""
    record = run_dir / RECORD_NAME
    what = None
    if record.is_file():
        try:
            previous = Submission.load(str(run_dir))
        except (OSError, ValueError) as exc:
            raise RunDirBusy(f"{record}: unreadable ({exc}); it may name a running job, so nothing was queued. "
                             "Check with squeue, then move the file away") from None
        state = query(previous.job_id)
        if state.state is None and not state.reachable:
            what = f"job {previous.job_id} may still run (its state is unknown: {state.problem})"
        elif state.state is not None and not state.final:
            what = f"job {previous.job_id} is {state.describe()}"
    holder = live_holder(run_dir)
    if what is None and holder is not None:
        what = f"a live trainer holds its lock {run_dir / LOCK_FILE} (pid {holder.get('pid')} on {holder.get('host')})"
    if what is not None:
        raise RunDirBusy(f"{run_dir} is in use: {what}; nothing was queued or written. Wait for it to end, stop it "
                         f"({make_command('cancel', RUN=run_dir)}), or choose another train.run_dir")


class TrainingExecutor(submitit.SlurmExecutor):
    """submitit's executor, with a batch script that survives every signal and requeues (`signal_safe`)."""

    def __init__(self, folder: Path, max_requeues: int, python: str | None):
        super().__init__(folder=folder, max_num_timeout=max_requeues, python=python)
        self.max_requeues = max_requeues

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        return signal_safe(super()._make_submission_file_text(command, uid), self.max_requeues)

    def _internal_process_submissions(self, delayed_submissions: list) -> list:
        """submitit queues several jobs as one array through a plain SlurmExecutor of its own, whose batch script
        has no requeue (a sweep trial stopped by a signal ended FAILED). Queue the array with this executor's script,
        as a single job is queued."""
        if len(delayed_submissions) == 1:
            return super()._internal_process_submissions(delayed_submissions)
        folder = submitit.core.utils.JobPaths.get_first_id_independent_folder(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        pickles = []
        for delayed in delayed_submissions:
            pickles.append(folder / f"{uuid.uuid4().hex}.pkl")
            delayed.set_timeout(self.parameters.get("time", 5), self.max_num_timeout)
            delayed.dump(pickles[-1])
        self.parameters["map_count"] = len(pickles)  # submitit's sbatch option for `--array=0-<n-1>%<parallelism>`
        try:
            first = self._submit_command(self._submitit_command_str)
        finally:
            del self.parameters["map_count"]
        jobs = [submitit.SlurmJob(folder=self.folder, job_id=f"{first.job_id}_{index}",
                                  tasks=list(range(first.num_tasks))) for index in range(len(pickles))]
        for job, pickled in zip(jobs, pickles):
            job.paths.move_temporary_file(pickled, "submitted_pickle")
        return jobs


# bash dies of USR1/USR2 and, waiting on a foreground srun, cannot act on any signal before srun exits. So srun runs
# in the background and the shell waits on it, surviving every signal; one that only the shell received
# (`scancel --batch`) goes on to the tasks as SIGUSR1 (after `--full` they have it already: a second delivery is
# harmless; after a plain `scancel` the job is ending and the forward fails quietly). Once srun is done the shell
# requeues the job if the tasks stopped for a signal and Slurm still runs it (a cancel or an outside requeue is
# Slurm's to finish): task 0 exits 75 once the trainer saved; a task killed by a signal (srun exits 128+N) is one
# that srun killed after receiving SIGTERM itself (`scancel --full`), or a wrapper signalled before it was up.
BATCH_SHELL = """\
# jobs/submit.py: survive every signal, pass stop signals on, requeue a stopped job (docs/cluster.md, Signals)
export SUBMITIT_LOG_LEVEL=WARNING
say() {{ echo "[jobs] $(date +%H:%M:%S) $*" >&2; }}
# An array task by <array>_<index>: its own numeric id may be the array's, which names every task of the array.
job=${{SLURM_ARRAY_JOB_ID:+${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}}}
job=${{job:-$SLURM_JOB_ID}}
on_stop() {{
    # slurmctld 22.05 refuses to signal one task of an array that has pending tasks: then srun passes it on
    if scancel --signal=USR1 "$job" 2>/dev/null || kill -USR1 "${{srun_pid:-}}" 2>/dev/null; then
        say "batch shell: SIG$1, passed on to the job's tasks as SIGUSR1"
    fi
}}
for sig in USR1 USR2 TERM INT; do trap "on_stop $sig" "$sig"; done
{srun} &
srun_pid=$!
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
wait "$srun_pid"
status=$?
# the tasks are done: a signal now (the requeue's own SIGTERM) has nothing to pass on and must not cut the lines below
for sig in USR1 USR2 TERM INT; do trap '' "$sig"; done
if [ "$status" = {preempted} ] || [ "$status" -gt 128 ]; then
    state=$(scontrol -o show job "$job" | grep -o 'JobState=[A-Z_]*')
    restarts=${{SLURM_RESTART_COUNT:-0}}
    if [ "$state" != JobState=RUNNING ]; then
        state=${{state:-JobState=unknown (scontrol did not answer)}}
        say "job ${{state#JobState=}}: Slurm is ending or requeueing it; not requeued from here"
    elif [ "$restarts" -ge {max_requeues} ]; then
        say "not requeued: reached slurm.max_requeues={max_requeues}; submit again with the same train.run_dir"
    else
        # said before the requeue: the requeue ends this shell, after KillWait at the latest
        say "requeueing (restart $((restarts + 1)) of at most {max_requeues})"
        scontrol requeue "$job" || say "Slurm refused the requeue; submit again with the same train.run_dir"
    fi
fi
exit "$status"
"""


def signal_safe(script: str, max_requeues: int) -> str:
    """submitit's sbatch script with its `srun ...` line run by BATCH_SHELL."""
    lines = script.split("\n")
    (index,) = [i for i, line in enumerate(lines) if line.startswith("srun ")]
    lines[index] = BATCH_SHELL.format(srun=lines[index], preempted=exitcodes.PREEMPTED,
                                      max_requeues=max_requeues).rstrip("\n")
    return "\n".join(lines)


def make_executor(slurm: SlurmConfig, *, folder: Path, job_name: str, tasks_per_node: int,
                  mounts: list[Path]) -> submitit.SlurmExecutor:
    """The config's slurm section -> a submitit executor (sbatch flags, signal, requeue budget, container)."""
    python, srun_args = container_launch(slurm, mounts=mounts, workdir=mounts[0])
    executor = TrainingExecutor(folder=folder, max_requeues=slurm.max_requeues, python=python)
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


def container_problems(slurm: SlurmConfig) -> list[tuple[str, str]]:
    """The container image, where it can be checked from here: Apptainer's is a file; pyxis takes a registry URI
    (checked by enroot on the node) or a local squashfs file."""
    image = slurm.container_image
    if not image:
        return []
    local = slurm.container_runtime == "apptainer" or image.startswith(("/", "./", "~")) \
        or image.endswith((".sqsh", ".squashfs", ".sif"))
    if local and "://" not in image and not Path(image).expanduser().is_file():
        return [("slurm.container_image", f"an existing {slurm.container_runtime} image file, got {image} "
                                          "(no such file)")]
    return []


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text


def _new_run_dir(cfg: Config) -> Path:
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir).resolve()
    base = Path("runs").resolve() / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def submit_array(executor: submitit.SlurmExecutor, jobs: list[TrainingJob], parallelism: int) -> list[str]:
    """Queue `jobs` as one Slurm job array (`--array=0-<n-1>%<parallelism>`: at most `parallelism` run at once);
    their job ids, `<array id>_<index>` in the order given (a single job is queued as a plain job)."""
    executor.update_parameters(array_parallelism=parallelism)
    with executor.batch():
        queued = [executor.submit(job) for job in jobs]
    return [str(job.job_id) for job in queued]
