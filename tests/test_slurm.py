"""Against a real two-node Slurm cluster (slurm/local_cluster.sh, brought up and down here): every row of the signal
table in docs/cluster.md (USR1, USR2, TERM, INT to the job, to the batch shell and to everything; the time-limit
signal; an outside `scontrol requeue`; a plain `scancel`), each ending in a checkpoint and a requeue that resumes to
the weights of an uninterrupted run in one run directory and one wandb run (or, for `scancel`, a clean cancel);
failures that must not requeue; status/logs/cancel while pending and with the controller unreachable.

The signal rows use a stand-in trainer with the trainer's exact contract (tests/test_jobs.py), all queued at once,
so they take about two minutes together. `make submit CONFIG=tiny` runs the real trainer end to end: uninterrupted,
stopped by `scancel --signal=USR1`, requeued from outside (a DataLoader worker and wandb offline), two tasks on one
node stopped by USR2, and two nodes (one process each, gloo) preempted by a job of a higher partition, which must
end with the weights of the two-task run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jobs.record import Submission
from jobs.state import query
from jobs.submit import submit
from stereo.train.sample_log import read_sample_log
from stereo.config import load_config
from test_jobs import progress, reference_weights, wait_for, write_standin

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
EVERY = 5  # the stand-in's periodic checkpoints


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_shards):
    """The local cluster (two nodes), up for this module; SLURM_CONF points every client at it."""
    script = ROOT / "slurm" / "local_cluster.sh"
    was_up = subprocess.run(["bash", str(script), "status"], capture_output=True).returncode == 0
    up = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True)
    assert up.returncode == 0, f"local cluster did not start (run `make setup` as root first):\n{up.stderr}"
    conf = up.stdout.strip().split("SLURM_CONF=", 1)[1]
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    last_submit = ROOT / "runs" / "last_submit"  # the tests submit from the checkout: keep the user's pointer
    pointer = last_submit.read_text() if last_submit.is_file() else None
    yield conf
    if pointer is None:
        last_submit.unlink(missing_ok=True)
    else:
        last_submit.write_text(pointer)
    if previous is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_up:
        subprocess.run(["bash", str(script), "down"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def expected_weights(tmp_path_factory) -> list[float]:
    """The shared uninterrupted reference run."""
    return reference_weights(tmp_path_factory.mktemp("reference"), STEPS)


def submit_standin(tmp: Path, step_s: float, overrides: list[str] = (), fail_at: int = -1,
                   fail_code: int = 3) -> Submission:
    run_dir = tmp / "run"
    overrides = [f"train.run_dir={run_dir}", f"slurm.folder={tmp / 'slurm'}", "slurm.cpus_per_task=1",
                 "slurm.mem_gb=1", *overrides]
    cfg = load_config("tiny", overrides)
    args = [str(write_standin(tmp)), str(run_dir), str(STEPS), str(EVERY), str(step_s), str(fail_at), str(fail_code)]
    return submit(cfg, config="tiny", overrides=overrides, python_args=args)


def wait_until_ended(job_id: str, timeout_s: float) -> str:
    return wait_all_ended([job_id], timeout_s)[job_id]


def wait_all_ended(job_ids: list[str], timeout_s: float) -> dict[str, str]:
    """job id -> its final state, polling all of them together."""
    ended: dict[str, str] = {}

    def poll():
        for job_id in set(job_ids) - set(ended):
            state = query(job_id)
            if state.final:
                ended[job_id] = state.state
        return len(ended) == len(job_ids)

    wait_for(poll, timeout_s, f"jobs {sorted(set(job_ids) - set(ended))} to end")
    return ended


def starts_of(submission: Submission) -> list[dict]:
    path = Path(submission.run_dir) / "starts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def assert_resumed_identically(submission: Submission, expected: list[float]) -> list[dict]:
    run_dir = Path(submission.run_dir)
    assert (run_dir / "final.json").is_file(), submission.log_path().read_text()
    starts = starts_of(submission)
    assert len(starts) >= 2 and query(submission.job_id).restarts >= 1, "the job was never requeued"
    assert starts[0]["step"] == 0 and all(s["step"] > 0 for s in starts[1:]), "a restart did not resume"
    assert [s["restart"] for s in starts] == list(range(len(starts)))
    assert {s["wandb_id"] for s in starts} == {submission.wandb_id}
    assert json.loads((run_dir / "final.json").read_text()) == expected
    return starts


def assert_clean_log(log: str) -> None:
    """One line per event: submitit's signal lines (printed twice before) are gone, and no line repeats."""
    assert "Caught signal" not in log and "Bypassing signal" not in log
    lines = [line for line in log.splitlines() if line.strip()]
    assert all(a != b for a, b in zip(lines, lines[1:])), log


# --- every signal, on the stand-in ----------------------------------------------------------------------------------

# row id -> the command that sends it (the job id is appended); "cancel" is `python -m stereo cancel` (scancel).
SIGNAL_ROWS = {
    **{f"{sig}-job": ["scancel", f"--signal={sig}"] for sig in ("USR1", "USR2", "TERM", "INT")},
    **{f"{sig}-batch": ["scancel", "--batch", f"--signal={sig}"] for sig in ("USR1", "USR2", "TERM", "INT")},
    **{f"{sig}-full": ["scancel", "--full", f"--signal={sig}"] for sig in ("USR1", "USR2", "TERM", "INT")},
    "outside-requeue": ["scontrol", "requeue"],
    "cancel": [sys.executable, "-m", "stereo", "cancel"],
}
TIME_LIMIT = "time-limit"


@pytest.fixture(scope="module")
def signal_rows(cluster, expected_weights, tmp_path_factory) -> dict[str, tuple[Submission, int]]:
    """Every row's job queued at once; each is signalled once its stand-in passes step 8. The time-limit row
    (a 1-minute limit with the signal 50 s before it; 40 steps of 1 s outlast the first start) is signalled by
    Slurm. Returns row -> (submission, the step its stand-in had reached when the signal was sent)."""
    jobs = {row: submit_standin(tmp_path_factory.mktemp(row), step_s=0.25) for row in SIGNAL_ROWS}
    jobs[TIME_LIMIT] = submit_standin(tmp_path_factory.mktemp(TIME_LIMIT), step_s=1.0,
                                      overrides=["slurm.time_min=1", "slurm.signal_delay_s=50"])
    signalled = signal_all({row: jobs[row] for row in SIGNAL_ROWS})  # the time-limit row: Slurm signals it
    wait_all_ended([submission.job_id for submission in jobs.values()], 400)
    return {row: (submission, signalled.get(row, 0)) for row, submission in jobs.items()}


def saved_step(log: str) -> int:
    """The step at which the stand-in saved for the first stop signal (its own line in the job log)."""
    match = re.search(r"stand-in: signal (\d+): saved at step (\d+)", log)
    assert match, log
    return int(match.group(2))


def signal_all(jobs: dict[str, Submission], target=lambda row, job: job.job_id,
               ready=lambda row, job: progress(Path(job.run_dir))) -> dict[str, int]:
    """Send each row's signal (to `target`) once `ready` says its stand-in passed step 8: row -> that step."""
    signalled: dict[str, int] = {}
    deadline = time.monotonic() + 300
    while len(signalled) < len(jobs) and time.monotonic() < deadline:
        for row, job in jobs.items():
            step = ready(row, job)
            if row not in signalled and step >= 8:
                subprocess.run([*SIGNAL_ROWS[row], job.run_dir if row == "cancel" else target(row, job)], cwd=ROOT,
                               check=True, capture_output=True)
                signalled[row] = step
        time.sleep(0.2)
    assert len(signalled) == len(jobs), f"never reached step 8: {set(jobs) - set(signalled)}"
    return signalled


@pytest.mark.parametrize("row", [row for row in SIGNAL_ROWS if row != "cancel"] + [TIME_LIMIT])
def test_signal_checkpoints_requeues_and_resumes(signal_rows, expected_weights, row):
    assert_signal_row(*signal_rows[row], expected_weights, row)


def assert_signal_row(submission: Submission, sent_at: int, expected_weights: list[float], row: str) -> None:
    assert query(submission.job_id).state == "COMPLETED", submission.log_path().read_text()
    starts = assert_resumed_identically(submission, expected_weights)
    log = submission.log_path().read_text()
    assert_clean_log(log)
    assert len(re.findall(r"\[jobs\] \S+ start \d+ of job", log)) == len(starts)
    if row == "TERM-full":
        # srun itself gets the SIGTERM and kills the tasks at once (SIGKILL): no save; the batch shell requeues
        # and the restart resumes from the newest periodic checkpoint.
        assert "saved at step" not in log
        assert starts[1]["step"] % EVERY == 0 and starts[1]["step"] <= sent_at + 1
    else:
        assert starts[1]["step"] == saved_step(log) >= sent_at  # saved at the step in progress
    if row != "outside-requeue":  # there Slurm requeues the job itself; here only the batch shell does
        assert "requeueing (restart 1 of at most 5)" in log
    if row.endswith("-batch") or row.endswith("-full"):
        assert f"batch shell: SIG{row.split('-')[0]}, passed on to the job's tasks as SIGUSR1" in log
    if row == TIME_LIMIT:
        assert "SIGUSR2: asking the trainer to save" in log


def test_plain_scancel_cancels_cleanly_after_a_save(signal_rows):
    assert_cancel_row(*signal_rows["cancel"])


def assert_cancel_row(submission: Submission, sent_at: int) -> None:
    state = query(submission.job_id)
    assert state.state == "CANCELLED" and state.restarts == 0
    log = submission.log_path().read_text()
    assert_clean_log(log)
    step = saved_step(log)
    assert step >= sent_at
    assert (Path(submission.run_dir) / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert "requeueing (restart" not in log and "not requeued from here" in log
    assert len(starts_of(submission)) == 1


# --- failures, limits, refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [2, 5])
def test_trainer_failure_is_not_requeued_and_the_log_names_it(cluster, tmp_path, code):
    submission = submit_standin(tmp_path, step_s=0.05, fail_at=6, fail_code=code)
    assert wait_until_ended(submission.job_id, 90) == "FAILED"
    assert query(submission.job_id).restarts == 0
    log = submission.log_path().read_text()
    meaning = {2: "config error", 5: "checkpoint error"}[code]
    assert f"trainer exited with code {code} ({meaning}): a failure, not requeued" in log
    assert "Traceback" not in log  # one `[jobs] stopped: ...` line instead
    assert_clean_log(log)
    status = subprocess.run([sys.executable, "-m", "stereo", "status", submission.run_dir], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    assert "FAILED" in status and f"stopped: jobs.job.JobStopped: trainer exited with code {code}" in status


def test_max_requeues_reached_saves_and_stops_with_the_reason(cluster, tmp_path):
    submission = submit_standin(tmp_path, step_s=0.25, overrides=["slurm.max_requeues=0"])
    wait_for(lambda: progress(Path(submission.run_dir)) >= 4, 90, "training to pass step 4")
    subprocess.run(["scancel", "--signal=USR1", submission.job_id], check=True)
    assert wait_until_ended(submission.job_id, 90) == "FAILED"
    assert query(submission.job_id).restarts == 0
    log = submission.log_path().read_text()
    assert "not requeued: reached slurm.max_requeues=0" in log
    saved = (Path(submission.run_dir) / "checkpoints" / "latest").read_text().strip()
    assert saved == f"step_{saved_step(log):08d}", "the trainer must still save before stopping"


def test_bad_config_is_refused_before_the_queue(cluster, tmp_path):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    last_submit = ROOT / "runs" / "last_submit"
    pointer = last_submit.read_text() if last_submit.is_file() else None
    done = subprocess.run([sys.executable, "-m", "stereo", "submit", "tiny", "optim.lr=-1",
                           f"train.run_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert "optim.lr: > 0, got -1.0" in done.stderr
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    assert not (tmp_path / "run").exists()
    assert (last_submit.read_text() if last_submit.is_file() else None) == pointer


# --- every signal, on sweep trials (job array tasks) ---------------------------------------------------------------

def submit_standin_array(tmp: Path, rows: list[str], step_s: float, overrides: list[str] = ()) -> dict[str, Submission]:
    """One job array with a stand-in trial per row, queued as `make sweep` queues its trials (make_executor and
    submit_array: the same executor and batch script as a single job), all running at once; row -> its record."""
    from jobs.submit import make_executor, submit_array
    from jobs.job import TrainingJob

    overrides = ["slurm.cpus_per_task=1", "slurm.mem_gb=1", *overrides]
    cfg = load_config("tiny", overrides)
    tmp.mkdir(parents=True, exist_ok=True)
    folder = tmp / "slurm"
    executor = make_executor(cfg.slurm, folder=folder, job_name="sweep-rows", tasks_per_node=1, mounts=[ROOT, tmp])
    standin = write_standin(tmp)
    trials = []
    for row in rows:
        run_dir = tmp / row
        run_dir.mkdir()
        (run_dir / "wandb_id").write_text(f"w{len(trials)}\n")
        trials.append(TrainingJob(python_args=[str(standin), str(run_dir), str(STEPS), str(EVERY), str(step_s)],
                                  cwd=str(ROOT), run_dir=str(run_dir), max_requeues=cfg.slurm.max_requeues,
                                  save_timeout_s=0.75 * cfg.slurm.signal_delay_s))
    job_ids = submit_array(executor, trials, len(trials))
    records = {}
    for row, job_id, trial in zip(rows, job_ids, trials):
        records[row] = Submission(job_id=job_id, run_dir=trial.run_dir, folder=str(folder),
                                  wandb_id=(Path(trial.run_dir) / "wandb_id").read_text().strip(), wandb_name=row,
                                  config="tiny", overrides=overrides, submitted_at="")
        records[row].save()
    return records


@pytest.fixture(scope="module")
def sweep_trial_rows(cluster, expected_weights, tmp_path_factory) -> dict[str, tuple[Submission, int]]:
    """The signal table on sweep trials (issue 22: a trial stopped by a signal ended FAILED, exit 75, 0 restarts).
    Each row is a job array of two trials, the row's and its twin, both signalled through the array's id (slurmctld
    22.05 refuses a signal to one task of an array with pending tasks, and the cluster runs 4 tasks at once), in
    waves of two arrays that fill the cluster; the time-limit row is an array of two as well. Returns row (and
    row-twin) -> (the trial's record, the step its stand-in had reached when the signal was sent)."""
    tmp = tmp_path_factory.mktemp("sweep_rows")
    rows, arrays, results = list(SIGNAL_ROWS), [], {}
    started = time.monotonic()
    try:
        for wave in [rows[i:i + 2] for i in range(0, len(rows), 2)] + [[TIME_LIMIT]]:
            trials = {}
            for row in wave:
                limit = ["slurm.time_min=1", "slurm.signal_delay_s=50"] if row == TIME_LIMIT else []
                trials[row] = submit_standin_array(tmp / row, [row, f"{row}-twin"], 1.0 if limit else 0.25, limit)
                arrays.append(trials[row][row].job_id.split("_")[0])
            signalled = {} if wave == [TIME_LIMIT] else signal_all(
                {row: pair[row] for row, pair in trials.items()}, target=lambda row, job: job.job_id.split("_")[0],
                ready=lambda row, job: min(progress(Path(t.run_dir)) for t in trials[row].values()))
            wait_all_ended([t.job_id for pair in trials.values() for t in pair.values()], 400)
            for row, pair in trials.items():
                for name, trial in pair.items():
                    results[name] = (trial, signalled.get(row, 0))
    except BaseException:  # leave no job behind on the shared cluster
        subprocess.run(["scancel", *arrays])
        raise
    print(f"sweep-trial signal rows: {2 * (len(rows) + 1)} trials in {len(rows) + 1} arrays ended "
          f"{time.monotonic() - started:.0f} s after the first was queued", file=sys.stderr)
    cancel = results["cancel"][0]
    script = Path(cancel.folder) / f"{cancel.job_id.split('_')[0]}_submission.sh"
    assert "#SBATCH --array=0-1%2" in script.read_text() and 'scontrol requeue "$job" ||' in script.read_text()
    return results


SWEEP_ROWS = [row for row in SIGNAL_ROWS if row != "cancel"] + [TIME_LIMIT]


@pytest.mark.slow
@pytest.mark.parametrize("row", [*SWEEP_ROWS, *(f"{row}-twin" for row in SWEEP_ROWS)])
def test_sweep_trial_signal_checkpoints_requeues_and_resumes(sweep_trial_rows, expected_weights, row):
    assert_signal_row(*sweep_trial_rows[row], expected_weights, row.removesuffix("-twin"))


@pytest.mark.slow
def test_sweep_trial_plain_scancel_cancels_cleanly_after_a_save(sweep_trial_rows):
    assert_cancel_row(*sweep_trial_rows["cancel"])


def make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A make of its own: none of the flags or variables of a `make test` that runs these tests."""
    env = {k: v for k, v in (os.environ if env is None else env).items()
           if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, env=env)


def test_pending_job_shows_its_reason_and_logs_says_it_has_not_started(cluster, tmp_path):
    submission = submit_standin(tmp_path, step_s=0.25, overrides=["slurm.extra_sbatch={begin: now+1hour}"])
    wait_for(lambda: query(submission.job_id).reason == "BeginTime", 30, "the job to wait for its begin time")
    status = make("status", f"RUN={submission.run_dir}")
    assert status.returncode == 0, status.stderr
    assert "state:      PENDING (BeginTime)" in status.stdout and "checkpoint: none yet" in status.stdout
    logs = make("logs", f"RUN={submission.run_dir}")
    assert logs.returncode == 0 and "Error" not in logs.stderr, logs.stderr
    assert f"job {submission.job_id} has not written its log yet: PENDING (BeginTime)" in logs.stdout
    cancel = make("cancel", f"RUN={submission.run_dir}")
    assert cancel.returncode == 0 and f"cancelled job {submission.job_id}" in cancel.stdout
    assert wait_until_ended(submission.job_id, 30) == "CANCELLED"


def test_unreachable_controller_is_never_a_final_state(cluster, tmp_path):
    """A running job, asked about through a configuration whose controller does not answer: `status` says the
    state is unknown (exit 1) and `cancel` cancels nothing and says so; the job keeps running."""
    submission = submit_standin(tmp_path, step_s=0.25)
    wait_for(lambda: progress(Path(submission.run_dir)) >= 1, 90, "the job to start")
    dead = tmp_path / "dead.conf"
    dead.write_text(re.sub(r"(?m)^SlurmctldPort=.*$", "SlurmctldPort=1", Path(cluster).read_text()))
    for conf in (str(dead), None):
        env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"} | ({"SLURM_CONF": conf} if conf else {})
        status = make("status", f"RUN={submission.run_dir}", env=env)
        assert status.returncode != 0 and "state:      unknown: cannot reach Slurm" in status.stdout
        assert "make slurm-up" in status.stderr
        cancel = make("cancel", f"RUN={submission.run_dir}", env=env)
        assert cancel.returncode != 0 and "nothing cancelled" in cancel.stderr and "already ended" not in cancel.stdout
    assert query(submission.job_id).state == "RUNNING"
    subprocess.run(["scancel", submission.job_id], check=True)


def test_second_submit_into_a_busy_run_directory_is_refused_before_the_queue(cluster, tmp_path):
    """The second job used to queue, overwrite slurm_job.json and stop with exit 6: `make status` then said FAILED
    and `make cancel` "already ended" while the first job trained on (issue 22)."""
    first = submit_standin(tmp_path, step_s=3.0)  # 2 minutes: it still runs when the second submit asks
    wait_for(lambda: progress(Path(first.run_dir)) >= 1, 300, "the first job to train")
    record = (Path(first.run_dir) / "slurm_job.json").read_text()
    done = subprocess.run([sys.executable, "-m", "stereo", "submit", "tiny", f"train.run_dir={first.run_dir}",
                           f"slurm.folder={tmp_path / 'second'}", "slurm.cpus_per_task=1", "slurm.mem_gb=1"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 6, done.stderr
    assert f"{first.run_dir} is in use: job {first.job_id} is RUNNING" in done.stderr
    assert "nothing was queued or written" in done.stderr and "Traceback" not in done.stderr
    assert (Path(first.run_dir) / "slurm_job.json").read_text() == record and not (tmp_path / "second").exists()
    status = make("status", f"RUN={first.run_dir}")
    assert status.returncode == 0 and "RUNNING" in status.stdout, status.stdout
    cancel = make("cancel", f"RUN={first.run_dir}")
    assert cancel.returncode == 0 and f"cancelled job {first.job_id}" in cancel.stdout, cancel.stdout + cancel.stderr
    assert wait_until_ended(first.job_id, 120) == "CANCELLED"


def test_slurm_up_starts_only_what_is_missing_and_keeps_the_running_job(cluster, tmp_path):
    """`make slurm-up`, which status, cancel and submit suggest when Slurm does not answer, tore the whole cluster
    down when one daemon was down, deleting the controller's state: the job vanished from squeue while its trainer
    went on outside Slurm (issue 22)."""
    state = Path(cluster).parent
    job = subprocess.run(["sbatch", "--parsable", "--nodelist=stereo-node1", "--cpus-per-task=1", "--mem=100M",
                          f"--output={tmp_path / 'sleep.out'}", "--wrap", "sleep 300"], capture_output=True, text=True,
                         check=True).stdout.strip()
    wait_for(lambda: query(job).state == "RUNNING", 120, "the job to run")
    pids = {name: int((state / f"{name}.pid").read_text()) for name in ("slurmctld", "slurmd-stereo-node1",
                                                                          "slurmd-stereo-node2")}
    for name in ("slurmd-stereo-node2", "slurmctld"):  # two daemons down; the job's node keeps its slurmd
        os.kill(pids[name], 15)
        wait_for(lambda: not Path(f"/proc/{pids[name]}").exists(), 60, f"{name} to stop")
    up = subprocess.run(["bash", str(ROOT / "slurm" / "local_cluster.sh"), "up"], capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    assert "started slurmctld slurmd(stereo-node2); kept what was running" in up.stderr, up.stderr
    assert int((state / "slurmd-stereo-node1.pid").read_text()) == pids["slurmd-stereo-node1"]
    assert query(job).state == "RUNNING", "the job's record was lost"
    squeue = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True).stdout
    assert f"{job} RUNNING" in squeue
    again = subprocess.run(["bash", str(ROOT / "slurm" / "local_cluster.sh"), "up"], capture_output=True, text=True)
    assert again.returncode == 0 and "already up" in again.stderr
    subprocess.run(["scancel", job], check=True)
    assert wait_until_ended(job, 120) == "CANCELLED"


def test_make_submit_without_slurm_says_how_and_leaves_nothing(demo_shards, tmp_path):
    """No SLURM_CONF: one message with the way to a cluster, a non-zero exit, and no run or submitit folder."""
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    runs = ROOT / "runs"
    before = set(runs.glob("tiny-*")) | set((runs / "slurm").glob("tiny-*"))
    done = make("submit", "CONFIG=tiny", "train.steps=4", env=env)
    assert done.returncode != 0
    assert "cannot reach Slurm" in done.stderr and "make slurm-up" in done.stderr and "SLURM_CONF=" in done.stderr
    assert done.stderr.count("cannot reach Slurm") == 1
    assert set(runs.glob("tiny-*")) | set((runs / "slurm").glob("tiny-*")) == before


# --- the real trainer: `make submit CONFIG=tiny` ------------------------------------------------------------------

# Tiny and short: 4 steps of batch 1, no validation set, wandb offline; such jobs run side by side on 2 cores.
TINY = ["train.steps=4", "checkpoint.every=2", "train.val_every=1000", "logging.every=1", "logging.image_every=1000",
        "logging.wandb=offline", "data.batch_size=1", "data.val=[]", "data.num_workers=0", "model.train_iters=2",
        "slurm.cpus_per_task=1", "slurm.mem_gb=6", "logging.sample_keys=true"]


def make_submit(tmp: Path, *extra: str) -> Submission:
    done = make("submit", "CONFIG=tiny", *TINY, *extra, f"train.run_dir={tmp / 'run'}", f"slurm.folder={tmp / 'slurm'}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"run directory: {tmp / 'run'}" in done.stdout and "wandb run: tiny (id " in done.stdout
    return Submission.load(str(tmp / "run"))


def final_weights(run_dir: Path) -> dict:
    """The module weights DeepSpeed saved in the newest complete checkpoint (fp32 on CPU; ZeRO-1 keeps them whole)."""
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    (states,) = latest.rglob("mp_rank_00_model_states.pt")
    return torch.load(states, map_location="cpu", weights_only=False)["module"]


def wandb_run_ids(run_dir: Path) -> set[str]:
    """wandb's offline run folders are named offline-run-<time>-<id>: one per start, one id per run."""
    return {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}


def wait_for_first_step(submission: Submission) -> None:
    metrics = Path(submission.run_dir) / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 1, 400,
             f"run {submission.run_dir} to log its first step")


@pytest.fixture(scope="module")
def tiny_runs(cluster, tmp_path_factory):
    """`make submit CONFIG=tiny` uninterrupted; one stopped by `scancel --signal=USR1` and one requeued from outside
    (`scontrol requeue`), both signals reaching every process of the step, a DataLoader worker and the wandb service
    included; and two tasks on one node (`--tasks-per-node 2`) stopped by the time-limit signal (USR2); side by
    side."""
    reference = make_submit(tmp_path_factory.mktemp("tiny_reference"))
    stopped = make_submit(tmp_path_factory.mktemp("tiny_usr1"), "data.num_workers=1")
    requeued = make_submit(tmp_path_factory.mktemp("tiny_requeued"), "data.num_workers=1")
    pair = make_submit(tmp_path_factory.mktemp("tiny_two_tasks"), "ARGS=--tasks-per-node 2")
    wait_for_first_step(stopped)
    subprocess.run(["scancel", "--signal=USR1", stopped.job_id], check=True)
    wait_for_first_step(requeued)
    subprocess.run(["scontrol", "requeue", requeued.job_id], check=True)
    wait_for_first_step(pair)
    subprocess.run(["scancel", "--signal=USR2", pair.job_id], check=True)
    runs = (reference, stopped, requeued, pair)
    states = wait_all_ended([submission.job_id for submission in runs], 900)
    for submission in runs:
        assert states[submission.job_id] == "COMPLETED", submission.log_path().read_text()
    return {"reference": reference, "usr1": stopped, "requeued": requeued, "two_tasks": pair}


def test_make_submit_tiny_runs_to_completion(tiny_runs):
    reference = tiny_runs["reference"]
    run_dir = Path(reference.run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (run_dir / "wandb_id").read_text().strip() == reference.wandb_id
    assert wandb_run_ids(run_dir) == {reference.wandb_id}
    status = make("status", f"RUN={run_dir}")
    assert status.returncode == 0
    assert "COMPLETED" in status.stdout and "finished" in status.stdout
    assert "checkpoint: step_00000004 (step 4); last logged step 4" in status.stdout
    logs = make("logs", f"RUN={run_dir}")
    assert logs.returncode == 0 and "trainer finished" in logs.stdout
    assert_clean_log(logs.stdout)


def assert_same_final_weights(reference: Submission, other: Submission) -> None:
    expected, got = final_weights(Path(reference.run_dir)), final_weights(Path(other.run_dir))
    assert expected.keys() == got.keys() and len(expected) > 100
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ from the reference"


@pytest.mark.parametrize("name", ["usr1", "requeued"])
def test_real_trainer_stopped_resumes_to_identical_weights(tiny_runs, name):
    """USR1 killed the wrapper before (docs/cluster.md); an outside requeue also reaches the DataLoader worker and
    wandb's service, which the trainer must survive to save."""
    submission = tiny_runs[name]
    assert query(submission.job_id).restarts >= 1, "the job was never requeued"
    log = submission.log_path().read_text()
    assert_clean_log(log)
    if name == "usr1":
        assert "requeueing (restart 1 of at most 5)" in log
    assert wandb_run_ids(Path(submission.run_dir)) == {submission.wandb_id}
    assert_same_final_weights(tiny_runs["reference"], submission)


def test_two_tasks_rendezvous_and_requeue_together(tiny_runs):
    """Two trainer processes (one per task) meet at the first node's port; USR2 reaches both tasks, the trainers'
    all-reduced stop flag stops them at the same step, and the whole job requeues and finishes."""
    submission = tiny_runs["two_tasks"]
    assert query(submission.job_id).restarts >= 1
    assert (Path(submission.run_dir) / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    task0, task1 = submission.log_path().read_text(), submission.log_path(task=1).read_text()
    node = re.search(r"task 0 of 2 on (\S+),", task0).group(1)
    assert f"task 1 of 2 on {node}," in task1 and "the trainer saved and exited" in task1
    assert "requeueing (restart 1 of at most 5)" in task0


def test_two_nodes_preempted_resume_to_the_weights_of_one_node(tiny_runs, tmp_path):
    """`slurm.nodes=2`, one process per node: the rendezvous comes from the Slurm environment (MASTER_ADDR the
    first node of SLURM_JOB_NODELIST, the port from the job id). A job of the higher `urgent` partition that needs
    all of stereo-node1 preempts it (PreemptMode=REQUEUE, GraceTime): SIGTERM, a save at the step in progress, a
    requeue. The resumed run ends with the weights of the two-task run on one node (same world size)."""
    run = make_submit(tmp_path, "slurm.nodes=2")
    wait_for_first_step(run)
    preemptor = subprocess.run(["sbatch", "--parsable", "--partition=urgent", "--nodelist=stereo-node1",
                                "--cpus-per-task=2", "--mem=1G", f"--output={tmp_path / 'urgent.out'}",
                                "--wrap", "sleep 2"], capture_output=True, text=True, check=True).stdout.strip()
    assert wait_until_ended(preemptor, 300) == "COMPLETED"
    assert wait_until_ended(run.job_id, 900) == "COMPLETED", run.log_path().read_text()
    assert query(run.job_id).restarts >= 1, "the job was never preempted"
    task0, task1 = run.log_path().read_text(), run.log_path(task=1).read_text()
    assert "task 0 of 2 on stereo-node1, rendezvous stereo-node1:" in task0
    assert "task 1 of 2 on stereo-node2, rendezvous stereo-node1:" in task1
    assert "SIGTERM: asking the trainer to save" in task0 and "requeueing (restart 1 of at most 5)" in task0
    assert_clean_log(task0)
    assert_same_final_weights(tiny_runs["two_tasks"], run)


@pytest.mark.slow
def test_make_submit_moves_a_run_from_two_nodes_to_one(tiny_runs, tmp_path):
    """A run on two nodes (one process each) submitted again with `slurm.nodes=1`: the trainer moves its checkpoint
    to one process, train.grad_accum 1 -> 2 keeps the global batch of 2, and the run trains on exactly the samples
    of the two-task run, step by step, with its losses (stage 0: the optimizer state loads whole)."""
    first = make_submit(tmp_path, "slurm.nodes=2", "train.steps=2")
    assert wait_until_ended(first.job_id, 900) == "COMPLETED", first.log_path().read_text()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    second = make_submit(tmp_path, "slurm.nodes=1")
    assert second.job_id != first.job_id and second.wandb_id == first.wandb_id
    assert wait_until_ended(second.job_id, 900) == "COMPLETED", second.log_path().read_text()
    log = second.log_path().read_text()
    assert "resuming at 1 process(es) (the checkpoint has 2): train.grad_accum 1 -> 2 keeps the global batch" in log
    assert "written by 2 processes, resuming with 1" in log and "resumed at step 2" in log
    pair = Path(tiny_runs["two_tasks"].run_dir)
    assert read_sample_log(tmp_path / "run") == read_sample_log(pair)
    # The tiny config trains BatchNorm on batch statistics, which makes runs with other reduction orders drift apart
    # (docs/training.md#elastic-resume): step 3 is computed on the moved weights and must match closely; step 4,
    # after the first update from the moved optimizer state, within the drift.
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if "loss" in r} for run_dir in (pair, tmp_path / "run")]
    assert abs(losses[1][3] - losses[0][3]) <= 1e-3 * abs(losses[0][3])
    assert abs(losses[1][4] - losses[0][4]) <= 5e-2 * abs(losses[0][4])


@pytest.mark.slow
def test_stopped_sweep_trial_requeues_and_ends_bit_identical_to_its_uninterrupted_twin(cluster, tmp_path):
    """Two trials of one job array, queued as `make sweep` queues them (the real trainer on its trial config): the
    second gets the preemption signal (SIGTERM) once it trained a step, saves, is requeued by the batch shell
    and resumes; both end with the same weights. (Before issue 22 it ended FAILED with exit 75.)"""
    from jobs.job import TrainingJob
    from jobs.submit import make_executor, submit_array
    from stereo.config import dump_yaml
    from stereo.train.run_files import wandb_run_id

    cfg = load_config("tiny", [*TINY, "train.steps=8", "slurm.signal_delay_s=120"])  # a slow step still saves
    trials, records = [], []
    for name in ("twin", "stopped"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        cfg.train.run_dir = str(run_dir)
        (run_dir / "trial_config.yaml").write_text(dump_yaml(cfg))
        trials.append(TrainingJob(python_args=["-m", "stereo", "train", str(run_dir / "trial_config.yaml")],
                                  cwd=str(ROOT), run_dir=str(run_dir), max_requeues=cfg.slurm.max_requeues,
                                  save_timeout_s=0.75 * cfg.slurm.signal_delay_s))
        records.append(wandb_run_id(run_dir))
    executor = make_executor(cfg.slurm, folder=tmp_path / "slurm", job_name="twins", tasks_per_node=1,
                             mounts=[ROOT, tmp_path])
    twin, stopped = submit_array(executor, trials, 2)
    try:
        wait_for(lambda: len((tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()) >= 2
                 if (tmp_path / "stopped" / "metrics.jsonl").is_file() else False, 600, "the trial's first step")
        subprocess.run(["scancel", "--signal=TERM", stopped], check=True)  # both tasks run: no pending task
        states = wait_all_ended([twin, stopped], 900)
    except BaseException:
        subprocess.run(["scancel", twin.split("_")[0]])
        raise
    log = (tmp_path / "slurm" / f"{stopped}_0_log.out").read_text()
    assert states == {twin: "COMPLETED", stopped: "COMPLETED"}, log
    assert query(stopped).restarts == 1 and "requeueing (restart 1 of at most 5)" in log
    assert "SIGTERM: asking the trainer to save" in log and "the trainer saved and exited" in log
    assert wandb_run_ids(tmp_path / "stopped") == {records[1]}
    expected, got = final_weights(tmp_path / "twin"), final_weights(tmp_path / "stopped")
    assert expected.keys() == got.keys() and len(expected) > 100
    assert all(torch.equal(expected[k], got[k]) for k in expected), "the resumed trial's weights differ"
