"""Faults injected on purpose into the real trainer (issue 12): every failure ends the run at once with a clear
message and a documented exit code, nothing is lost, and a resume never silently mixes configs.

End-to-end runs use the tiny config on the demo shards (64x128 crops, 2 GRU iterations, ZeRO-0 as `make train`);
a module-scoped base run (4 steps, checkpoints at 2 and 4) is copied for each resume scenario.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from stereo.train.checkpoint import COMPLETE, complete_steps
from test_train import REPO, TORCHRUN, descendants, metrics, wait_for_step

BASE = ["augment.crop=[64,128]", "data.batch_size=1", "model.train_iters=2", "model.valid_iters=2",
        "logging.every=1", "logging.image_every=0", "train.val_every=1000", "data.val=[]", "logging.wandb=disabled",
        "schedule.warmup_steps=2", "data.num_workers=1"]
EXIT_BOUND_S = 120  # generous on a busy 2-core machine; the defects hung forever


def trainer(run_dir: Path, *overrides: str, env: dict | None = None, slow_steps: float = 0.0) -> subprocess.Popen:
    """`python -m stereo train tiny ...` (one process, no torchrun), output to RUN_DIR.log; `slow_steps` adds that many
    seconds to every step (tests/poisoned_train.py)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    entry = [str(REPO / "tests" / "poisoned_train.py"), f"--slow-steps={slow_steps}"] if slow_steps else ["-m", "stereo"]
    cmd = [sys.executable, *entry, "train", "tiny", f"train.run_dir={run_dir}", *BASE, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MASTER_PORT": str(free_port()), **(env or {})})


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 600) -> tuple[int, str]:
    code = proc.wait(timeout=timeout)
    return code, (run_dir.parent / f"{run_dir.name}.log").read_text()


def strict_metrics(run_dir: Path) -> list[dict]:
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=reject) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def no_process_mentions(text: str) -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                return False
        except OSError:
            pass
    return True


# The closing paragraph of each exit code (docs/training.md, "Exit codes"): its first line.
CLOSING = {0: "done in ", 1: "training stopped (internal error, exit code 1)", 2: "config error: ",
           3: "non-finite steps in a row", 4: "training stopped (data error, exit code 4)",
           5: "training stopped (checkpoint error, exit code 5)",
           6: "training stopped (run directory in use, exit code 6)", 75: "stopped by a signal: checkpointed at step",
           130: "training stopped (interrupted, exit code 130)"}


def assert_clean_exit(code: int, log: str, run_dir: Path, expected: int) -> list[str]:
    """The run ended with `expected`, its output ending in that code's one closing paragraph (at most 6 lines, no
    traceback: only exit 1, a bug, prints one, before it), and no process of the run is left. Returns the
    paragraph."""
    assert code == expected, log[-3000:]
    lines = log.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if CLOSING[expected] in line)
    paragraph = lines[start:]
    assert len(paragraph) <= 6, "\n".join(paragraph)
    assert log.count("Traceback") == (expected == 1), log[-3000:]
    assert not any(line.startswith(("Traceback", "  File ", "Exception in thread")) for line in paragraph)
    assert no_process_mentions(f"train.run_dir={run_dir}"), "a trainer or loader worker outlived the run"
    return paragraph


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """4 steps, checkpoints at steps 2 and 4; started over leftovers of a checkpoint-less earlier start."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n{"step": 2, "loss": 98.0}\n')
    code, log = finish(trainer(run_dir, "train.steps=4", "checkpoint.every=2"), run_dir)
    assert_clean_exit(code, log, run_dir, 0)
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


# ---- 1. any exception ends every rank and every loader worker ------------------------------------------------------

def test_exception_on_one_rank_ends_all_ranks_and_workers_promptly(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "metrics.jsonl").mkdir(parents=True)  # rank 0 fails at its first log line, inside the loop
    log_path = tmp_path / "torchrun.log"
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "stereo", "train", "tiny",
           f"train.run_dir={run_dir}", *BASE, "data.num_workers=2", "train.steps=50"]
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=EXIT_BOUND_S + 120)
        except subprocess.TimeoutExpired:
            for pid in [proc.pid, *descendants(proc.pid)]:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the trainer hung after the error:\n{log_path.read_text()[-3000:]}")
    elapsed = time.monotonic() - start
    out = log_path.read_text()
    assert code != 0
    assert "[rank 0] training stopped (internal error, exit code 1): IsADirectoryError" in out
    assert f"[rank 0] no checkpoint was written yet in {run_dir}" in out
    # rank 1 promised "its report is above" even when its peer was killed without one, and named no checkpoint
    assert "[rank 1] stopping: another rank's process is gone (its report is above, unless it was killed" in out
    assert f"[rank 1] no checkpoint was written yet in {run_dir}" in out
    assert no_process_mentions(f"train.run_dir={run_dir}"), "a trainer or loader worker outlived the run"
    assert elapsed < EXIT_BOUND_S + 60, f"{elapsed:.0f} s"
    assert no_process_mentions(f"train.run_dir={run_dir}"), "a trainer or loader worker outlived the run"


def test_data_error_in_a_worker_keeps_its_type_and_exit_code(tmp_path):
    """A BadDataError raised in a DataLoader worker reaches the exit path as itself: exit 4 and its own message."""
    from test_stream import write_shards

    from stereo.config.schema import AugmentConfig, DataConfig, DatasetSpec
    from stereo.data.loader import build_train_loader
    from stereo.exitcodes import DATA
    from stereo.train.failures import exit_code_for, failure_report

    broken = {i: {"meta.json": b"{}"} for i in range(4)}  # no image and no disparity member
    write_shards(tmp_path / "bad", [list(range(4))], damage=broken)
    cfg = DataConfig(train=[DatasetSpec("bad", str(tmp_path / "bad"))], batch_size=1, num_workers=1,
                     max_bad_sample_rate=0.0)
    with pytest.raises(Exception) as caught:
        next(iter(build_train_loader(cfg, AugmentConfig(crop=[32, 32]), 512, 0, 1)))
    assert exit_code_for(caught.value) == DATA
    report = failure_report(caught.value, 0, tmp_path, DATA)
    assert report.startswith("[rank 0] training stopped (data error, exit code 4): shard ")
    assert "Traceback" not in report and "data.max_bad_sample_rate=0.0" in report


# ---- 3. damaged checkpoints: named, and the older complete one is used ----------------------------------------------

def test_damaged_newest_checkpoint_falls_back_to_the_older_one(base_run, tmp_path):
    run_dir = copy_of(base_run, tmp_path)
    states = run_dir / "checkpoints/step_00000004/ds/mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])  # truncated, COMPLETE still there
    code, log = finish(trainer(run_dir, "train.steps=5", "checkpoint.every=2"), run_dir)
    assert code == 0, log[-3000:]
    assert f"checkpoint {run_dir}/checkpoints/step_00000004 is unusable: {states}: " in log
    assert "expected" in log and "truncated" in log
    assert f"resuming from the older checkpoint {run_dir}/checkpoints/step_00000002 instead" in log
    assert "start 2 of run" in log and "resumed at step 2" in log
    steps = [r["step"] for r in strict_metrics(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]  # what step 4's damaged checkpoint had was trained again, logged once


def test_no_usable_checkpoint_stops_with_exit_5_and_deletes_nothing(base_run, tmp_path):
    run_dir = copy_of(base_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints/step_00000004/ds")
    trainer_state = run_dir / "checkpoints/step_00000002/trainer_state_rank0.pt"
    trainer_state.write_bytes(trainer_state.read_bytes()[:100])
    code, log = finish(trainer(run_dir, "train.steps=6"), run_dir)
    assert code == 5, log[-3000:]
    assert "training stopped (checkpoint error, exit code 5)" in log
    assert "step_00000004: " in log and "ds/mp_rank_00_model_states.pt: missing" in log
    assert f"step_00000002: {trainer_state}: 100 bytes, expected" in log
    assert complete_steps(run_dir / "checkpoints") == [2, 4]
    paragraph = assert_clean_exit(code, log, run_dir, 5)
    # the newest complete checkpoint is named, never called "intact" (it was the damaged one, issue 22)
    assert paragraph[-1] == f"[rank 0] the newest complete checkpoint is {run_dir}/checkpoints/step_00000004 (step 4)"


# ---- 4. disk full while saving -----------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    assert done.returncode == 0, f"this test mounts a 30 MB tmpfs (needs root): {done.stderr}"
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_full_names_the_path_keeps_the_previous_checkpoint_and_exits(small_disk):
    run_dir = small_disk / "run"
    proc = trainer(run_dir, "train.steps=6", "checkpoint.every=1")
    try:
        code = proc.wait(timeout=EXIT_BOUND_S + 200)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the trainer hung after the failed save")
    log = (small_disk / "run.log").read_text()
    assert code == 5, log[-3000:]
    assert "checkpoint save at step 2 failed: " in log and "no space left on device" in log
    assert f"{run_dir}/checkpoints/step_00000002.tmp" in log
    assert f"the previous checkpoint {run_dir}/checkpoints/step_00000001 is intact" in log
    assert complete_steps(run_dir / "checkpoints") == [1]
    assert not list((run_dir / "checkpoints").glob("*.tmp")), "the partial save must be removed"
    from stereo.train.checkpoint import find_checkpoint

    find_checkpoint(run_dir)  # verifies every recorded size and checksum


# ---- 5. one trainer per run directory ------------------------------------------------------------------------------

def test_second_trainer_on_a_run_directory_is_refused_and_the_first_is_unharmed(tmp_path):
    run_dir = tmp_path / "run"
    first = trainer(run_dir, "train.steps=200", "checkpoint.every=100")
    wait_for_step(run_dir, 1, first)
    second = subprocess.run([sys.executable, "-m", "stereo", "train", "tiny", f"train.run_dir={run_dir}", *BASE],
                            cwd=REPO, capture_output=True, text=True, timeout=EXIT_BOUND_S,
                            env={**os.environ, "MASTER_PORT": str(free_port())})
    assert second.returncode == 6, second.stderr[-3000:]
    assert f"another trainer is using this run directory (pid {first.pid}" in second.stderr
    assert first.poll() is None, "the first trainer must not be disturbed"
    first.send_signal(signal.SIGTERM)
    code, log = finish(first, run_dir)
    assert_clean_exit(code, log, run_dir, 75)
    # "no run directory was created" before, of a directory that exists
    assert assert_clean_exit(second.returncode, second.stderr, run_dir, 6)[-1] \
        == f"[rank 0] nothing in {run_dir} was changed: it belongs to the trainer that holds its lock"
    assert not (run_dir / "trainer.lock").exists(), "the lock is released on exit"
    steps = [r["step"] for r in strict_metrics(run_dir) if "loss" in r]
    assert steps == sorted(set(steps)), "the refused trainer wrote into the run"


# ---- 6. resume compares the stored config ------------------------------------------------------------------------

def test_resume_refuses_a_changed_config_and_keeps_config_yaml(base_run, tmp_path):
    run_dir = copy_of(base_run, tmp_path)
    before = (run_dir / "config.yaml").read_text()
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "stereo", "train", "tiny", f"train.run_dir={run_dir}", *BASE,
                           "train.steps=6", "data.batch_size=2", "augment.crop=[64,160]"], cwd=REPO,
                          capture_output=True, text=True, timeout=EXIT_BOUND_S,
                          env={**os.environ, "MASTER_PORT": str(free_port())})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "2 key(s) differ: augment.crop: [64, 128] -> [64, 160]; data.batch_size: 1 -> 2" in done.stderr
    assert "train.allow_config_change=true" in done.stderr
    assert "Traceback" not in done.stderr
    assert (run_dir / "config.yaml").read_text() == before
    assert len(list((run_dir / "starts").glob("*.yaml"))) == 1
    assert time.monotonic() - started < EXIT_BOUND_S


def test_allowed_config_change_is_recorded(base_run, tmp_path):
    run_dir = copy_of(base_run, tmp_path)
    code, log = finish(trainer(run_dir, "train.steps=5", "augment.crop=[64,160]", "train.allow_config_change=true"),
                       run_dir)
    assert code == 0, log[-3000:]
    assert "config changed since the checkpoint: augment.crop: [64, 128] -> [64, 160]" in log
    events = [r for r in strict_metrics(run_dir) if r.get("event") == "config_change"]
    assert len(events) == 1 and events[0]["step"] == 4
    assert events[0]["changes"]["augment.crop"] == {"was": [64, 128], "now": [64, 160]}
    assert events[0]["changes"]["train.steps"] == {"was": 4, "now": 5}
    assert sorted(p.name for p in (run_dir / "starts").iterdir()) == ["start_001.yaml", "start_002.yaml"]


def test_model_shape_change_is_a_checkpoint_error_naming_the_cause(base_run, tmp_path):
    run_dir = copy_of(base_run, tmp_path)
    code, log = finish(trainer(run_dir, "model.hidden_dims=[24,24,24]", "train.allow_config_change=true"), run_dir)
    assert code == 5, log[-3000:]
    assert "size mismatch: the checkpoint's weights do not fit this model (was model.* changed?)" in log
    assert "Traceback" not in log
    assert complete_steps(run_dir / "checkpoints") == [2, 4]


# ---- 8 and 9: values, the fresh-start log, grad_norm at ZeRO 0, strict JSON -------------------------------------------

def test_missing_shards_are_refused_before_the_run_directory_exists(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "stereo", "train", "tiny", f"train.run_dir={run_dir}",
                           f"data.train=[{{name: x, shards: {tmp_path}/nowhere}}]"], cwd=REPO, capture_output=True,
                          text=True, timeout=EXIT_BOUND_S)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("config error: data.train[0].shards: ")
    assert f"{tmp_path}/nowhere" in done.stderr
    assert not run_dir.exists()
    assert_clean_exit(done.returncode, done.stderr, run_dir, 2)


def test_base_run_logs_strict_json_with_a_grad_norm_and_drops_checkpointless_leftovers(base_run):
    records = strict_metrics(base_run)
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]  # the leftover lines 1 and 2 (loss 99, 98) are gone
    assert all(r["loss"] < 90 for r in losses)
    assert all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in losses)
    startup = [r for r in records if "startup/total_s" in r]
    assert len(startup) == 1 and startup[0]["step"] == 1
    assert startup[0]["startup/total_s"] >= startup[0]["startup/deepspeed_init_s"] > 0


# ---- Ctrl-C --------------------------------------------------------------------------------------------------------

def test_ctrl_c_saves_the_step_in_progress_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    proc = trainer(run_dir, "train.steps=500", "checkpoint.every=1000")
    wait_for_step(run_dir, 3, proc)
    last_logged = max(r["step"] for r in metrics(run_dir) if "loss" in r)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    code, log = finish(proc, run_dir)
    assert code == 75, log[-3000:]
    saved = complete_steps(run_dir / "checkpoints")
    assert len(saved) == 1 and saved[0] in (last_logged, last_logged + 1), (last_logged, saved)
    assert f"checkpointed at step {saved[0]}" in log
    assert "Ctrl-C again to stop without saving" in log
    assert "KeyboardInterrupt" not in log
    assert assert_clean_exit(code, log, run_dir, 75)[0].endswith(f"exiting 75; to resume: make resume RUN={run_dir}")
    assert (run_dir / "checkpoints" / f"step_{saved[0]:08d}" / COMPLETE).is_file()


# ---- the rest of the exit-code table (issue 22) ---------------------------------------------------------------------

def test_internal_error_exit_1_prints_one_traceback_then_the_paragraph(tmp_path):
    """One process (torchrun adds a traceback of its own, test above)."""
    run_dir = tmp_path / "run"
    (run_dir / "metrics.jsonl").mkdir(parents=True)  # the first log line fails: not a failure we name
    code, log = finish(trainer(run_dir, "train.steps=3", "data.num_workers=0"), run_dir)
    paragraph = assert_clean_exit(code, log, run_dir, 1)
    assert paragraph == ["[rank 0] training stopped (internal error, exit code 1): IsADirectoryError: [Errno 21] Is a "
                         f"directory: '{run_dir}/metrics.jsonl'", f"[rank 0] no checkpoint was written yet in {run_dir}"]


def test_non_finite_steps_in_a_row_exit_3_naming_the_checkpoint(tmp_path):
    """A learning rate of 1e30 makes every loss after the first update non-finite: no test hook needed."""
    run_dir = tmp_path / "run"
    code, log = finish(trainer(run_dir, "optim.lr=1e30", "optim.grad_clip=0", "train.max_bad_steps=2",
                               "train.steps=6", "checkpoint.every=1", "data.num_workers=0"), run_dir)
    paragraph = assert_clean_exit(code, log, run_dir, 3)
    assert paragraph[0] == (f"[rank 0] stopping: 2 non-finite steps in a row at step 2 (train.max_bad_steps=2); the newest "
                    f"checkpoint is {run_dir}/checkpoints/step_00000001")


def test_shards_deleted_under_live_loader_workers_exit_4_without_a_traceback(tmp_path):
    """Killing the workers on the way out set off torch's SIGCHLD handler: exit 1 and a 25-line traceback after
    the right paragraph (issue 22)."""
    import tarfile

    # the demo's first shard as one shard per sample: the deletion is felt at the next sample, not 12 later
    shards, entries = tmp_path / "shards", []
    shards.mkdir()
    with tarfile.open(REPO / "shards/demo/train/000000.tar") as demo:
        members = demo.getmembers()
        for key in dict.fromkeys(m.name.split(".", 1)[0] for m in members):
            path = shards / f"{len(entries):06d}.tar"
            with tarfile.open(path, "w") as tar:
                for member in (m for m in members if m.name.split(".", 1)[0] == key):
                    tar.addfile(member, demo.extractfile(member))
            entries.append({"name": path.name, "num_samples": 1, "bytes": path.stat().st_size, "sha256": ""})
    (shards / "manifest.json").write_text(json.dumps({"dataset": "one_per_shard", "shards": entries}))
    run_dir = tmp_path / "run"
    proc = trainer(run_dir, f"data.train=[{{name: demo, shards: {shards}}}]", "data.num_workers=1",
                   "data.shard_retries=0", "data.retry_backoff_s=0", "train.steps=500", "checkpoint.every=1000")
    wait_for_step(run_dir, 1, proc)
    for tar in shards.glob("*.tar"):
        tar.unlink()  # with the loader worker alive
    code, log = finish(proc, run_dir, timeout=EXIT_BOUND_S + 200)
    paragraph = assert_clean_exit(code, log, run_dir, 4)
    assert str(shards) in paragraph[0] and paragraph[-1] == f"[rank 0] no checkpoint was written yet in {run_dir}"


@pytest.fixture
def read_only_later(tmp_path):
    """A run directory on a bind mount that the test can make read-only (root ignores file permissions)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    done = subprocess.run(["mount", "--bind", str(run_dir), str(run_dir)], capture_output=True, text=True)
    assert done.returncode == 0, f"this test bind-mounts the run directory (needs root): {done.stderr}"
    yield run_dir
    subprocess.run(["umount", "-l", str(run_dir)], check=True)


def test_run_directory_made_read_only_mid_run_is_a_checkpoint_error_naming_the_path(read_only_later):
    """It was "internal error", exit 1, two tracebacks and a trainer.lock left behind (issue 22)."""
    run_dir = read_only_later
    proc = trainer(run_dir, "train.steps=500", "checkpoint.every=1000", "data.num_workers=0")
    wait_for_step(run_dir, 1, proc)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(run_dir)], check=True)
    code, log = finish(proc, run_dir, timeout=EXIT_BOUND_S + 200)
    paragraph = assert_clean_exit(code, log, run_dir, 5)
    assert f"cannot write {run_dir}/" in paragraph[0] and "read-only file system" in paragraph[0]
    # the lock cannot go (read-only); it says so, and the next trainer takes over the dead holder's lock
    assert f"could not remove the lock {run_dir}/trainer.lock (Read-only file system)" in log
    subprocess.run(["mount", "-o", "remount,bind,rw", str(run_dir)], check=True)
    code, log = finish(trainer(run_dir, "train.steps=1", "checkpoint.every=1000", "data.num_workers=0"), run_dir)
    assert_clean_exit(code, log, run_dir, 0)


def test_second_ctrl_c_stops_at_once_with_130(tmp_path):
    """The second Ctrl-C counts after the trainer's debounce (a terminal may deliver one press twice): steps slowed
    well past it keep the step in progress running when it comes, however fast the machine."""
    from stereo.train.signals import INTERRUPT_DEBOUNCE_S

    run_dir = tmp_path / "run"
    proc = trainer(run_dir, "train.steps=500", "checkpoint.every=1000", "data.num_workers=0",
                   slow_steps=3 * INTERRUPT_DEBOUNCE_S)
    wait_for_step(run_dir, 1, proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(INTERRUPT_DEBOUNCE_S + 0.3)
    os.killpg(proc.pid, signal.SIGINT)
    code, log = finish(proc, run_dir)
    paragraph = assert_clean_exit(code, log, run_dir, 130)
    assert "interrupted again: stopped without saving the step in progress" in paragraph[0]
    assert not (run_dir / "trainer.lock").exists()


# code -> the test above whose run ends with it (each checks its closing paragraph with assert_clean_exit)
EXIT_CASES = {0: "base_run",
              1: "test_internal_error_exit_1_prints_one_traceback_then_the_paragraph",
              2: "test_missing_shards_are_refused_before_the_run_directory_exists",
              3: "test_non_finite_steps_in_a_row_exit_3_naming_the_checkpoint",
              4: "test_shards_deleted_under_live_loader_workers_exit_4_without_a_traceback",
              5: "test_no_usable_checkpoint_stops_with_exit_5_and_deletes_nothing",
              6: "test_second_trainer_on_a_run_directory_is_refused_and_the_first_is_unharmed",
              75: "test_ctrl_c_saves_the_step_in_progress_and_exits_cleanly",
              130: "test_second_ctrl_c_stops_at_once_with_130"}


def test_every_row_of_the_exit_code_table_has_a_case():
    import re

    from stereo.exitcodes import MEANING

    text = (REPO / "docs" / "training.md").read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = [int(code) for code in re.findall(r"^\| (\d+) \|", text, re.M)]
    assert sorted(documented) == sorted(MEANING) == sorted(EXIT_CASES)
    module = Path(__file__).read_text()
    for name in EXIT_CASES.values():
        body = re.split(r"\n(?:def |@)", module.split(f"\ndef {name}(", 1)[1], maxsplit=1)[0]
        assert "assert_clean_exit(" in body, name
