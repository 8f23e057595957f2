"""jobs/ without a running cluster: rendezvous from Slurm variables, the submission record, the sbatch script that
the config's slurm section produces, the checks `submit` makes before queueing, and the job wrapper driving a real
stand-in trainer process through stop signals (the Slurm side of each signal is in tests/test_slurm.py)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs.bench_restart import first_record_after
from jobs.job import STOP_SIGNALS, JobStopped, TrainingJob, handles_signal
from jobs.record import Submission
from jobs.rendezvous import expand_hostlist, master_port, trainer_env
from jobs.submit import make_executor
from stereo import exitcodes
from stereo.config import load_config
from stereo.sweep.spec import build_trials, load_sweep

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for `python -m stereo train` with the same contract (stereo/exitcodes.py, docs/architecture.md):
# checkpoints under RUN_DIR/checkpoints/step_NNNNNNNN with a COMPLETE marker and a `latest` pointer, resume from the
# newest one, and on SIGUSR1/SIGTERM/SIGINT finish the step, save at that step and exit 75. Its "weights" depend
# only on the step count, so an interrupted and resumed run must end with exactly the weights of an uninterrupted
# one. Arguments: RUN_DIR STEPS EVERY STEP_S [FAIL_AT [FAIL_CODE [STARTUP_S]]]: exit FAIL_CODE at step FAIL_AT;
# sleep STARTUP_S before installing the signal handlers (a trainer still importing).
STANDIN_TRAINER = r'''
import json, os, signal, sys, time
from pathlib import Path

run_dir, steps, every, step_s = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
fail_at = int(sys.argv[5]) if len(sys.argv) > 5 else -1
fail_code = int(sys.argv[6]) if len(sys.argv) > 6 else 3
time.sleep(float(sys.argv[7]) if len(sys.argv) > 7 else 0.0)
stop = []
for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: stop.append(signum))
ckpts = run_dir / "checkpoints"

def save(step, weights):
    step_dir = ckpts / f"step_{step:08d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    (step_dir / "weights.json").write_text(json.dumps(weights))
    (step_dir / "COMPLETE").write_text(f"{step}\n")
    (ckpts / "latest").write_text(step_dir.name + "\n")

step, weights = 0, [0.0, 1.0]
if (ckpts / "latest").is_file():
    name = (ckpts / "latest").read_text().strip()
    step, weights = int(name[len("step_"):]), json.loads((ckpts / name / "weights.json").read_text())
env = os.environ
start = {"step": step, "wandb_id": (run_dir / "wandb_id").read_text().strip(), "pid": os.getpid(),
         "restart": int(env.get("SLURM_RESTART_COUNT", "0")), "rank": env.get("RANK"), "world": env.get("WORLD_SIZE"),
         "master": f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"}
with open(run_dir / "starts.jsonl", "a") as f:
    f.write(json.dumps(start) + "\n")
while step < steps:
    time.sleep(step_s)
    step += 1
    weights = [weights[0] * 0.5 + step, weights[1] * 1.01]
    if step == fail_at:
        print(f"stand-in: simulated crash at step {step}", file=sys.stderr, flush=True)
        sys.exit(fail_code)

    (run_dir / "progress").write_text(str(step))
    if stop:
        save(step, weights)
        print(f"stand-in: signal {stop[0]}: saved at step {step}", file=sys.stderr, flush=True)
        sys.exit(75)
    if step % every == 0:
        save(step, weights)
save(step, weights)
(run_dir / "final.json").write_text(json.dumps(weights))
'''


def write_standin(folder: Path) -> Path:
    path = folder / "standin_trainer.py"
    path.write_text(STANDIN_TRAINER)
    return path


def reference_weights(tmp: Path, steps: int) -> list[float]:
    """An uninterrupted stand-in run, outside any job."""
    run_dir = tmp / "reference"
    run_dir.mkdir()
    (run_dir / "wandb_id").write_text("reference\n")
    subprocess.run([sys.executable, str(write_standin(tmp)), str(run_dir), str(steps), "5", "0"], check=True)
    return json.loads((run_dir / "final.json").read_text())


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def progress(run_dir: Path) -> int:
    path = run_dir / "progress"
    return int(path.read_text() or 0) if path.is_file() else 0


# --- rendezvous -------------------------------------------------------------------------------------------------

def test_hostlist_expansion_keeps_order_and_zero_padding():
    assert expand_hostlist("gpu[01-03,7],login2") == ["gpu01", "gpu02", "gpu03", "gpu7", "login2"]
    assert expand_hostlist("rack[1-2]-n[08-09]") == ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]
    assert expand_hostlist("localhost") == ["localhost"]


def test_master_port_is_stable_per_job_and_in_range():
    assert master_port("123456") == master_port("123456")
    assert master_port("123456") != master_port("123457")
    assert all(20000 <= master_port(str(j)) < 40000 for j in (0, 1, 19999, 20000, 987654321))


def test_trainer_env_maps_slurm_task_to_torch_distributed():
    env = trainer_env({"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                       "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[07-08]"})
    assert env == {"MASTER_ADDR": "node07", "MASTER_PORT": str(master_port("4242")), "RANK": "5",
                   "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "NODE_RANK": "1"}
    with pytest.raises(RuntimeError, match="SLURM_JOB_ID"):
        trainer_env({})


# --- record -----------------------------------------------------------------------------------------------------

def test_submission_record_round_trip_and_last_submit_pointer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no submission yet"):
        Submission.load()
    run_dir = tmp_path / "runs" / "tiny-x"
    run_dir.mkdir(parents=True)
    record = Submission(job_id="77", run_dir=str(run_dir), folder=str(tmp_path / "slurm"), wandb_id="abcd1234",
                        wandb_name="tiny-x", config="tiny", overrides=["train.steps=4"], submitted_at="now")
    record.save()
    assert Submission.load() == record
    assert Submission.load(str(run_dir)) == record
    assert record.log_path() == tmp_path / "slurm" / "77_0_log.out"
    with pytest.raises(FileNotFoundError, match="not a submitted run"):
        Submission.load(str(tmp_path))


# --- the sbatch script from the config ----------------------------------------------------------------------------

def sbatch_script(tmp_path: Path, overrides: list[str], tasks_per_node: int = 1) -> str:
    cfg = load_config("tiny", overrides)
    executor = make_executor(cfg.slurm, folder=tmp_path / "slurm", job_name="tiny-test",
                             tasks_per_node=tasks_per_node, mounts=[tmp_path, tmp_path / "runs"])
    return executor._make_submission_file_text(executor._submitit_command_str, "uid")


def test_sbatch_script_follows_the_slurm_section(tmp_path):
    script = sbatch_script(tmp_path, ["slurm.partition=gpu", "slurm.account=vision", "slurm.qos=high",
                                      "slurm.nodes=4", "slurm.gpus_per_node=8", "slurm.cpus_per_task=10",
                                      "slurm.mem_gb=480", "slurm.time_min=1440", "slurm.signal_delay_s=180",
                                      "slurm.constraint=a100", "slurm.extra_sbatch={exclusive: '', reservation: r1}"],
                           tasks_per_node=8)
    for flag in ("--partition=gpu", "--account=vision", "--qos=high", "--nodes=4", "--ntasks-per-node=8",
                 "--gpus-per-node=8", "--cpus-per-task=10", "--mem=480GB", "--time=1440", "--signal=USR2@180",
                 "--constraint=a100", "--reservation=r1", "--job-name=tiny-test"):
        assert f"#SBATCH {flag}\n" in script, flag
    assert "#SBATCH --exclusive\n" in script
    assert "--kill-on-bad-exit=1" in next(line for line in script.splitlines() if line.startswith("srun"))
    assert "--gpus-per-node" not in sbatch_script(tmp_path, ["slurm.gpus_per_node=0"])


def test_batch_shell_survives_signals_and_forwards_stops(tmp_path):
    """submitit's srun line runs in the background of a shell that traps every stop signal (docs/cluster.md)."""
    script = sbatch_script(tmp_path, [])
    lines = script.splitlines()
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert lines[srun].endswith(" &") and "-m submitit.core._submit" in lines[srun]
    assert 'for sig in USR1 USR2 TERM INT; do trap "on_stop $sig" "$sig"; done' in lines[:srun]
    assert lines[srun + 1:srun + 4] == ["srun_pid=$!",
                                        'while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done',
                                        'wait "$srun_pid"']
    assert 'if [ "$status" = 75 ]' in script and 'elif [ "$restarts" -ge 5 ]; then' in script  # tiny: 5 requeues
    assert "export SUBMITIT_LOG_LEVEL=WARNING" in lines
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_container_runtimes_wrap_the_job(tmp_path):
    pyxis = sbatch_script(tmp_path, ["slurm.container_image=registry#stereo:1", "slurm.container_runtime=pyxis"])
    srun_line = next(line for line in pyxis.splitlines() if line.startswith("srun"))
    assert "--container-image=registry#stereo:1" in srun_line
    mounts = next(arg for arg in srun_line.split() if arg.startswith("--container-mounts="))
    assert set(mounts.split("=", 1)[1].split(",")) == {f"{tmp_path}:{tmp_path}", f"{tmp_path}/runs:{tmp_path}/runs"}
    assert " python -u -m submitit.core._submit" in srun_line
    apptainer = sbatch_script(tmp_path, ["slurm.container_image=/images/stereo.sif",
                                         "slurm.container_runtime=apptainer"])
    srun_line = next(line for line in apptainer.splitlines() if line.startswith("srun"))
    assert "apptainer exec --nv --bind" in srun_line and "/images/stereo.sif python -u -m submitit" in srun_line


@pytest.fixture
def sbatch_keeper(tmp_path, monkeypatch) -> Path:
    """An `sbatch` first on PATH that keeps each script it is given (kept/1.sh, 2.sh, ...) and answers as sbatch
    does: how submitit's array path writes its script is checked here without a cluster (test_slurm runs it)."""
    kept = tmp_path / "kept"
    kept.mkdir()
    (tmp_path / "bin").mkdir()
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.write_text(f"#!/bin/bash\nn=$(( $(ls {kept} | wc -l) + 1 ))\ncp \"$1\" {kept}/$n.sh\n"
                      "echo \"Submitted batch job $((4240 + n))\"\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{sbatch.parent}:{os.environ['PATH']}")
    return kept


def test_job_array_gets_the_signal_safe_batch_script_of_a_single_job(tmp_path, sbatch_keeper):
    """submitit queues an array through a plain executor of its own: a sweep trial stopped by a signal was never
    requeued (issue 22). The array's script is the single job's, with the array line added."""
    from jobs.submit import submit_array

    cfg = load_config("tiny", [])
    jobs = [TrainingJob(python_args=["-c", "pass"], cwd=str(tmp_path), run_dir=str(tmp_path / f"t{i}"),
                        max_requeues=5, save_timeout_s=10) for i in range(3)]
    executor = make_executor(cfg.slurm, folder=tmp_path / "slurm", job_name="tiny-test", tasks_per_node=1,
                             mounts=[tmp_path])
    single = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    assert submit_array(executor, jobs, 2) == ["4241_0", "4241_1", "4241_2"]
    array = (sbatch_keeper / "1.sh").read_text()
    assert "#SBATCH --array=0-2%2\n" in array
    assert "--array" not in single and "map_count" not in executor.parameters
    # the same script, but for the array line and the log names (array id and index for the job id)
    assert [line.replace("%A_%a", "%j") for line in array.splitlines() if "--array" not in line] \
        == single.splitlines()
    assert 'scontrol requeue "$job" ||' in array
    # a task's own numeric id may be the array's (every task): the shell names the task as <array>_<index>
    assert 'job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}' in array


def test_sweep_arrays_share_max_concurrent(tmp_path, sbatch_keeper, monkeypatch, demo_shards):
    """A sweep run again while trials of its earlier array still run: the new array takes only what is left of
    max_concurrent, or waits for the earlier trials (3 trials ran at once with max_concurrent 2, issue 22)."""
    from jobs.sweep import _submit, array_limits
    from stereo.sweep.book import SweepDir, TrialRecord

    assert array_limits(2, []) == (2, None)
    assert array_limits(3, ["7_1"]) == (2, None)
    assert array_limits(2, ["7_1", "7_3"]) == (2, "afterany:7_1:7_3")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "demo").symlink_to(demo_shards)
    spec = load_sweep("tiny").with_overrides(["slurm.cpus_per_task=1"])
    book = SweepDir(spec.name)
    trials = build_trials(spec, book.path)
    todo = [TrialRecord(t.id, t.overrides, t.cfg.train.run_dir) for t in trials[:3]]
    for record in todo:
        Path(record.run_dir).mkdir(parents=True)
    running = [TrialRecord("t03", [], str(tmp_path / "t03"), job_id="9_3", state="running")]
    assert _submit(spec, book, todo, trials[0], active=running) == 0
    assert "#SBATCH --array=0-2%1\n" in (sbatch_keeper / "1.sh").read_text()
    running.append(TrialRecord("t04", [], str(tmp_path / "t04"), job_id="9_4", state="queued"))
    for record in todo:  # as if the first array had ended (no Slurm here to ask)
        (Path(record.run_dir) / "slurm_job.json").unlink()
    assert _submit(spec, book, todo, trials[0], active=running) == 0
    second = (sbatch_keeper / "2.sh").read_text()
    assert "#SBATCH --array=0-2%2\n" in second and "#SBATCH --dependency=afterany:9_3:9_4\n" in second


def test_make_passes_overrides_with_spaces_and_quotes_as_one_word_each():
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    done = subprocess.run(["make", "--no-print-directory", "config", "CONFIG=tiny",
                           "data.train=[{name: two words, shards: shards/x y}]", "logging.group=it's $HOME"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "  - name: two words\n    shards: shards/x y\n" in done.stdout
    assert "  group: it's $HOME\n" in done.stdout


# --- submit's checks before the queue ----------------------------------------------------------------------------

def submit_cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stereo", "submit", *args, f"slurm.folder={tmp_path / 'slurm'}"],
                          cwd=ROOT, capture_output=True, text=True, env=env)


def test_submit_names_every_path_that_does_not_resolve_and_writes_nothing(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "000000.tar").write_bytes(b"")
    (tmp_path / "afile").write_text("")
    done = submit_cli(tmp_path, "tiny",
                      f"data.train=[{{name: a, shards: {tmp_path}/nowhere}},"
                      f" {{name: c, shards: 'pipe:curl -s http://x/{{0..9}}.tar'}}, {{name: d, shards: s3://b/x.tar}}]",
                      f"data.val=[{{name: v, shards: '{tmp_path}/shards/{{000000..000002}}.tar'}}]",
                      f"model.init_from={tmp_path}/none.pth", f"model.pretrained.edgenext={tmp_path}/e.pth",
                      "slurm.container_runtime=apptainer", f"slurm.container_image={tmp_path}/stereo.sif",
                      f"train.run_dir={tmp_path}/afile/run")
    assert done.returncode == exitcodes.CONFIG, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("config error: data.train[0].shards: ")
    for key, path in [("data.train[0].shards", f"{tmp_path}/nowhere"),
                      ("data.val[0].shards", f"{tmp_path}/shards/000001.tar"), ("model.init_from", "none.pth"),
                      ("model.pretrained.edgenext", "e.pth"), ("slurm.container_image", "stereo.sif"),
                      ("train.run_dir", f"{tmp_path}/afile is a file")]:
        assert f"{key}: " in message and path in message.split(f"{key}: ", 1)[1], (key, path, message)
    assert "data.train[1]" not in message  # pipe: commands run on the compute nodes only
    assert "data.train[2].shards: s3://b/x.tar: " in message  # URLs are checked (test_remote: why they fail)
    assert not (tmp_path / "slurm").exists()


def test_submit_without_slurm_says_how_to_reach_one_and_leaves_nothing(tmp_path):
    """`--no-check-paths` skips the files (data mounted on compute nodes only) but not Slurm's presence."""
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    done = submit_cli(tmp_path, "--no-check-paths", "tiny", f"model.init_from={tmp_path}/none.pth",
                      f"train.run_dir={tmp_path}/run", env=env)
    assert done.returncode == 1, done.stderr
    assert "cannot reach Slurm" in done.stderr and "nothing was queued or written" in done.stderr
    assert "make slurm-up" in done.stderr and "export SLURM_CONF=" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 2, done.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "slurm").exists()


def test_submit_refuses_a_run_directory_that_a_live_trainer_holds(tmp_path):
    """Refused before anything is queued (the record of a running job is in test_slurm)."""
    from jobs.submit import refuse_busy
    from stereo.train.failures import RunDirBusy
    from stereo.train.rundir import RunDirLock

    run_dir = tmp_path / "my run"
    lock = RunDirLock(run_dir).acquire()
    try:
        with pytest.raises(RunDirBusy) as refused:
            refuse_busy(run_dir)
        assert f"a live trainer holds its lock {run_dir}/trainer.lock (pid {os.getpid()}" in str(refused.value)
        assert f"make cancel 'RUN={run_dir}'" in str(refused.value)
    finally:
        lock.release()
    refuse_busy(run_dir)  # released: free again
    assert sorted(p.name for p in run_dir.iterdir()) == []


# --- the job, driving a real trainer process ----------------------------------------------------------------------


@pytest.fixture
def slurm_task_env(monkeypatch):
    """This process as task 0 of a one-task Slurm job; the job's signal handlers and excepthook are undone after."""
    for key, value in {"SLURM_JOB_ID": "31337", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost",
                       "SLURM_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(key, value)
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    hook = sys.excepthook
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    sys.excepthook = hook


def standin_job(tmp_path: Path, steps: int, step_s: float, fail_at: int = -1, fail_code: int = 3,
                startup_s: float = 0.0, max_requeues: int = 3, save_timeout_s: float = 20) -> TrainingJob:
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "wandb_id").write_text("w1\n")
    args = [str(write_standin(tmp_path)), str(run_dir), str(steps), "5", str(step_s), str(fail_at), str(fail_code),
            str(startup_s)]
    return TrainingJob(python_args=args, cwd=str(tmp_path), run_dir=str(run_dir), max_requeues=max_requeues,
                       save_timeout_s=save_timeout_s)


def start(job: TrainingJob) -> None:
    """What __call__ does before it waits: the wrapper's handlers in this (main) thread, the trainer started."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, job._on_signal)
    job._start(trainer_env(os.environ))


def signal_self_when(predicate, sig: signal.Signals) -> None:
    """Slurm's delivery to the wrapper: `sig` to this process once `predicate()` holds (from a helper thread)."""
    def send():
        wait_for(predicate, 30, f"the moment to send {sig.name}")
        os.kill(os.getpid(), sig)
    threading.Thread(target=send, daemon=True).start()


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
def test_stop_signal_saves_at_the_step_and_a_restart_resumes_to_identical_weights(tmp_path, slurm_task_env, sig):
    """The wrapper turns each stop signal it receives into SIGUSR1 for the trainer (which here never sees the
    original: Slurm would send it to both), which saves at that step; a fresh copy of the job (what a requeue
    unpickles) resumes to the weights of an uninterrupted run."""
    expected = reference_weights(tmp_path, steps=40)
    job = standin_job(tmp_path, steps=40, step_s=0.05)
    run_dir = Path(job.run_dir)
    start(job)
    signal_self_when(lambda: progress(run_dir) >= 7, sig)
    assert job._supervise() == exitcodes.PREEMPTED
    assert job._stop == sig
    stopped_at = progress(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    assert 7 <= stopped_at < 40
    fresh = pickle.loads(pickle.dumps(job))  # what submitit keeps for the requeued job
    assert fresh._proc is None and fresh._stop is None and fresh.run_dir == job.run_dir
    assert fresh() == {"run_dir": job.run_dir, "restarts": 0}
    assert json.loads((run_dir / "final.json").read_text()) == expected
    starts = [json.loads(line) for line in (run_dir / "starts.jsonl").read_text().splitlines()]
    assert [s["step"] for s in starts] == [0, stopped_at]
    assert {s["wandb_id"] for s in starts} == {"w1"}
    assert starts[0]["master"] == f"localhost:{master_port('31337')}"


def test_trainer_still_starting_is_ended_at_once(tmp_path, slurm_task_env, capfd):
    """A trainer that has not installed its handlers has trained nothing in this start: no waiting for a save."""
    job = standin_job(tmp_path, steps=40, step_s=0.05, startup_s=60)
    start(job)
    signal_self_when(lambda: True, signal.SIGTERM)
    began = time.monotonic()
    assert job._supervise() == -signal.SIGKILL
    assert time.monotonic() - began < 20, "the wrapper waited for a trainer that could not save"
    assert "SIGTERM: the trainer is still starting (no step to save): ending it" in capfd.readouterr().err


def test_trainer_that_does_not_save_in_time_is_killed(tmp_path, slurm_task_env, capfd):
    job = standin_job(tmp_path, steps=40, step_s=120, save_timeout_s=2)
    start(job)
    signal_self_when(lambda: handles_signal(job._proc.pid, signal.SIGUSR1), signal.SIGUSR1)
    began = time.monotonic()
    assert job._supervise() == -signal.SIGKILL
    assert time.monotonic() - began < 30
    assert "did not exit within 2 s of the stop signal: killing it" in capfd.readouterr().err


@pytest.mark.parametrize("code", [exitcodes.CONFIG, exitcodes.TOO_MANY_BAD_STEPS, exitcodes.DATA,
                                  exitcodes.CHECKPOINT, exitcodes.RUN_DIR_BUSY, exitcodes.INTERNAL])
def test_trainer_failure_stops_the_job_naming_the_exit_code(tmp_path, slurm_task_env, code):
    job = standin_job(tmp_path, steps=20, step_s=0.01, fail_at=3, fail_code=code)
    with pytest.raises(JobStopped, match=rf"trainer exited with code {code} \({exitcodes.MEANING[code]}\): "
                                         "a failure, not requeued"):
        job()


def test_job_past_max_requeues_refuses_to_train(tmp_path, slurm_task_env, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    job = standin_job(tmp_path, steps=20, step_s=0.01, max_requeues=2)
    with pytest.raises(JobStopped, match="requeued 3 times, more than slurm.max_requeues=2"):
        job()
    assert not (Path(job.run_dir) / "starts.jsonl").exists()


def test_bench_restart_times_against_whole_second_slurm_stamps_are_never_negative():
    from jobs.bench_restart import seconds_until

    assert seconds_until(100.0, 100.7) == pytest.approx(0.15)  # requeued within the second of the save
    assert seconds_until(100.0, 100.0) == pytest.approx(0.5)
    assert seconds_until(103.0, 100.25) == pytest.approx(3.25)


def test_bench_restart_reads_the_first_resumed_step_with_its_startup_record(tmp_path):
    """The trainer logs its start-up breakdown as a record of its own at the first step of a start."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "time": 10.0, "loss": 1.0}, {"step": 2, "time": 11.0, "loss": 0.9},
        {"step": 3, "time": 50.0, "loss": 0.8}, {"step": 3, "time": 50.1, "startup/imports_s": 4.0,
                                                  "startup/first_step_s": 1.5, "startup/total_s": 30.0},
        {"step": 4, "time": 51.0, "loss": 0.7}]) + '{"step": 5, "ti')  # a line being written
    assert first_record_after(metrics, 2) == {"step": 3, "time": 50.1, "loss": 0.8, "startup/imports_s": 4.0,
                                              "startup/first_step_s": 1.5, "startup/total_s": 30.0}
    assert first_record_after(metrics, 5) is None
    assert first_record_after(tmp_path / "none.jsonl", 0) is None


def test_handles_signal_reads_the_installed_handlers():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        assert not handles_signal(os.getpid(), signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, lambda *_: None)
        assert handles_signal(os.getpid(), signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_wandb_id_read_back_by_submit_and_trainer_replaces_a_damaged_one(tmp_path, capsys):
    """One reader for RUN_DIR/wandb_id (submit, sweep and the trainer): bytes that are not UTF-8 made submit end
    in a traceback; a damaged id is replaced with a warning, a good one kept."""
    from stereo.train.run_files import wandb_run_id

    first = wandb_run_id(tmp_path)
    assert len(first) == 8 and wandb_run_id(tmp_path) == first
    (tmp_path / "wandb_id").write_bytes(b"\xff\xfe\n")
    second = wandb_run_id(tmp_path)
    assert second != first and (tmp_path / "wandb_id").read_text() == second + "\n"
    assert f"{tmp_path}/wandb_id: not a wandb run id" in capsys.readouterr().err


@pytest.mark.parametrize("junk", [b"", b"\xff\xfe", b"[1]", b'{"job_id": "1"'])
def test_damaged_slurm_job_json_is_named_by_status_and_blocks_a_new_submit(tmp_path, junk):
    """slurm_job.json is read back by status, logs, cancel, the sweep and submit's busy check: damaged, it is
    named (no traceback), and submit refuses to queue over what may be a running job's record."""
    from jobs.submit import refuse_busy
    from stereo.train.failures import RunDirBusy

    (tmp_path / "slurm_job.json").write_bytes(junk)
    with pytest.raises(ValueError, match=f"{tmp_path}/slurm_job.json: "):
        Submission.load(str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "stereo", "status", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode != 0 and f"{tmp_path}/slurm_job.json: " in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(RunDirBusy, match="unreadable"):
        refuse_busy(tmp_path)
