"""Against a real single-node Slurm cluster (slurm/local_cluster.sh, brought up and down here): submission, the
three preemption paths (submitit's interrupt, the time-limit signal, an outside `scontrol requeue`), each resuming
to the weights of an uninterrupted run in one run directory and one wandb run; refusals and failures that must
not requeue. The preemption paths use a stand-in trainer with the trainer's exact contract (tests/test_jobs.py),
so they take seconds; `make submit CONFIG=tiny` runs the real trainer end to end, uninterrupted, interrupted by the
time-limit signal and requeued from outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch

from jobs.manage import FINAL_STATES, job_state
from jobs.record import Submission
from jobs.submit import submit
from stereo.config import load_config
from test_jobs import progress, reference_weights, wait_for, write_standin

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The local cluster, up for this module; SLURM_CONF points every client (sbatch, squeue, submitit) at it."""
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


def submit_standin(tmp: Path, step_s: float, overrides: list[str] = (), fail_at: int = -1) -> Submission:
    run_dir = tmp / "run"
    overrides = [f"train.run_dir={run_dir}", f"slurm.folder={tmp / 'slurm'}", "slurm.cpus_per_task=1",
                 "slurm.mem_gb=2", *overrides]
    cfg = load_config("tiny", overrides)
    args = [str(write_standin(tmp)), str(run_dir), str(STEPS), "5", str(step_s), str(fail_at)]
    return submit(cfg, config="tiny", overrides=overrides, python_args=args)


def wait_until_ended(job_id: str, timeout_s: float) -> str:
    return wait_for(lambda: (lambda s: s if s.split()[0] in FINAL_STATES else None)(job_state(job_id)[0]),
                    timeout_s, f"job {job_id} to end")


def assert_resumed_identically(submission: Submission, expected: list[float]) -> list[dict]:
    run_dir = Path(submission.run_dir)
    assert wait_until_ended(submission.job_id, 240) == "COMPLETED", submission.log_path().read_text()
    starts = [json.loads(line) for line in (run_dir / "starts.jsonl").read_text().splitlines()]
    assert len(starts) >= 2 and job_state(submission.job_id)[1] >= 1, "the job was never requeued"
    assert starts[0]["step"] == 0 and all(s["step"] > 0 for s in starts[1:]), "a restart did not resume"
    assert [s["restart"] for s in starts] == list(range(len(starts)))
    assert {s["wandb_id"] for s in starts} == {submission.wandb_id}
    assert json.loads((run_dir / "final.json").read_text()) == expected
    return starts


def test_submitit_interrupt_checkpoints_requeues_and_resumes(cluster, tmp_path, expected_weights):
    submission = submit_standin(tmp_path, step_s=0.25)
    wait_for(lambda: progress(Path(submission.run_dir)) >= 8, 60, "training to pass step 8")
    submitit.SlurmJob(folder=submission.folder, job_id=submission.job_id)._interrupt()  # TERM, then USR2
    starts = assert_resumed_identically(submission, expected_weights)
    log = submission.log_path().read_text()
    assert "asking the trainer to checkpoint" in log and "requeueing (restart 1" in log
    assert starts[1]["step"] >= 8


def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, tmp_path, expected_weights):
    # A 1-minute limit with the signal 50 s before it: slurmctld checks limits about every 30 s, so the signal
    # lands 10-40 s into each start; 40 steps of 1 s outlast the first start.
    submission = submit_standin(tmp_path, step_s=1.0, overrides=["slurm.time_min=1", "slurm.signal_delay_s=50"])
    assert_resumed_identically(submission, expected_weights)
    log = submission.log_path().read_text()
    assert "this job is timed-out" in log and "requeueing (restart 1" in log


def test_outside_scontrol_requeue_resumes(cluster, tmp_path, expected_weights):
    submission = submit_standin(tmp_path, step_s=0.25)
    wait_for(lambda: progress(Path(submission.run_dir)) >= 8, 60, "training to pass step 8")
    subprocess.run(["scontrol", "requeue", submission.job_id], check=True)
    assert_resumed_identically(submission, expected_weights)
    log = submission.log_path().read_text()
    assert "Calling checkpoint method" not in log and "Bypassing signal SIGTERM" in log  # no submitit hook
    assert "trainer saved and exited 75 after a stop signal" in log


def test_trainer_failure_is_not_requeued_and_the_log_says_why(cluster, tmp_path):
    submission = submit_standin(tmp_path, step_s=0.05, fail_at=6)
    assert wait_until_ended(submission.job_id, 60) == "FAILED"
    assert job_state(submission.job_id)[1] == 0
    log = submission.log_path().read_text()
    assert "simulated crash at step 6" in log
    assert "trainer exited with code 3 (0 = done, 75 = preempted): a failure, not requeued" in log
    status = subprocess.run([sys.executable, "-m", "stereo", "status", submission.run_dir], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    assert "FAILED" in status and "stopped: jobs.job.JobStopped: trainer exited with code 3" in status


def test_max_requeues_reached_stops_with_the_reason(cluster, tmp_path):
    submission = submit_standin(tmp_path, step_s=0.25, overrides=["slurm.max_requeues=0"])
    wait_for(lambda: progress(Path(submission.run_dir)) >= 4, 60, "training to pass step 4")
    submitit.SlurmJob(folder=submission.folder, job_id=submission.job_id)._interrupt()
    assert wait_until_ended(submission.job_id, 60) == "FAILED"
    assert job_state(submission.job_id)[1] == 0
    log = submission.log_path().read_text()
    assert "not requeued: reached slurm.max_requeues=0" in log
    saved = (Path(submission.run_dir) / "checkpoints" / "latest").read_text().strip()
    assert saved == f"step_{progress(Path(submission.run_dir)):08d}", "the trainer must still save before stopping"


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


# --- the real trainer: `make submit CONFIG=tiny` ------------------------------------------------------------------

# Tiny and short: 4 steps of batch 1, no validation set, wandb offline; such jobs run side by side on 2 cores.
TINY = ["train.steps=4", "checkpoint.every=2", "train.val_every=1000", "logging.every=1", "logging.image_every=1000",
        "logging.wandb=offline", "data.batch_size=1", "data.val=[]", "data.num_workers=0", "model.train_iters=2",
        "slurm.cpus_per_task=1", "slurm.mem_gb=6"]


def make_submit(tmp: Path, *extra: str) -> Submission:
    done = subprocess.run(["make", "--no-print-directory", "submit", "CONFIG=tiny", *TINY, *extra,
                           f"train.run_dir={tmp / 'run'}", f"slurm.folder={tmp / 'slurm'}"],
                          cwd=ROOT, capture_output=True, text=True)
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
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 1, 300,
             f"run {submission.run_dir} to log its first step")


@pytest.fixture(scope="module")
def tiny_runs(cluster, tmp_path_factory):
    """`make submit CONFIG=tiny` uninterrupted, one interrupted by Slurm's USR2 (the time-limit signal), and one
    requeued from outside (`scontrol requeue`: SIGTERM to every process of the step, a DataLoader worker and the
    wandb service included), side by side."""
    reference = make_submit(tmp_path_factory.mktemp("tiny_reference"))
    interrupted = make_submit(tmp_path_factory.mktemp("tiny_interrupted"))
    requeued = make_submit(tmp_path_factory.mktemp("tiny_requeued"), "data.num_workers=1")
    wait_for_first_step(interrupted)
    submitit.SlurmJob(folder=interrupted.folder, job_id=interrupted.job_id)._interrupt(timeout=True)
    wait_for_first_step(requeued)
    subprocess.run(["scontrol", "requeue", requeued.job_id], check=True)
    for submission in (reference, interrupted, requeued):
        assert wait_until_ended(submission.job_id, 600) == "COMPLETED", submission.log_path().read_text()
    return reference, interrupted, requeued


def test_make_submit_tiny_runs_to_completion(tiny_runs):
    reference, *_ = tiny_runs
    run_dir = Path(reference.run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (run_dir / "wandb_id").read_text().strip() == reference.wandb_id
    assert wandb_run_ids(run_dir) == {reference.wandb_id}
    status = subprocess.run(["make", "--no-print-directory", "status", f"RUN={run_dir}"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    assert "COMPLETED" in status and "finished" in status and "step_00000004" in status
    logs = subprocess.run(["make", "--no-print-directory", "logs", f"RUN={run_dir}"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    assert "trainer finished" in logs


def assert_same_final_weights(reference: Submission, other: Submission) -> None:
    expected, got = final_weights(Path(reference.run_dir)), final_weights(Path(other.run_dir))
    assert expected.keys() == got.keys() and len(expected) > 100
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ from the reference"


def test_real_trainer_interrupted_resumes_to_identical_weights(tiny_runs):
    reference, interrupted, _ = tiny_runs
    assert job_state(interrupted.job_id)[1] >= 1, "the job was never requeued"
    assert "requeueing (restart 1" in interrupted.log_path().read_text()
    assert wandb_run_ids(Path(interrupted.run_dir)) == {interrupted.wandb_id}
    assert_same_final_weights(reference, interrupted)


def test_real_trainer_outside_requeue_resumes_to_identical_weights(tiny_runs):
    """Data loader workers and wandb's service get the SIGTERM too: the trainer must survive both to save."""
    reference, _, requeued = tiny_runs
    assert job_state(requeued.job_id)[1] >= 1, "the job was never requeued"
    assert wandb_run_ids(Path(requeued.run_dir)) == {requeued.wandb_id}
    assert_same_final_weights(reference, requeued)


def test_two_tasks_rendezvous_and_requeue_together(cluster, tmp_path, tiny_runs):
    """Two trainer processes (one per task) meet at the first node's port; a USR2 reaches task 0's hook only, the
    trainers' all-reduced stop flag stops both at the same step, and the whole job requeues and finishes."""
    done = subprocess.run([sys.executable, "-m", "stereo", "submit", "--tasks-per-node", "2", "tiny", *TINY,
                           f"train.run_dir={tmp_path / 'run'}", f"slurm.folder={tmp_path / 'slurm'}"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    submission = Submission.load(str(tmp_path / "run"))
    metrics = Path(submission.run_dir) / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 1, 300,
             "the two-process run to log its first step")
    submitit.SlurmJob(folder=submission.folder, job_id=submission.job_id)._interrupt(timeout=True)
    assert wait_until_ended(submission.job_id, 600) == "COMPLETED", submission.log_path().read_text()
    assert job_state(submission.job_id)[1] >= 1
    assert (Path(submission.run_dir) / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    task1 = submission.log_path(task=1).read_text()
    assert "task 1/2" in task1 and "trainer saved and exited 75 after a stop signal" in task1
    assert "task 0/2" in submission.log_path().read_text()
