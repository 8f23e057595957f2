"""Checkpoint manager on a real DeepSpeed engine (a small conv net, one gloo process): atomic commit, rotation,
round trip, and a kill -9 during a save that leaves the previous checkpoint loadable."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port
from stereo.train.checkpoint import COMPLETE, CheckpointManager, complete_steps, find_checkpoint, step_dir_name

REPO = Path(__file__).resolve().parents[1]


def _toy_engine(width: int = 8):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.ReLU(), torch.nn.Conv2d(width, 1, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    return engine


def _step(engine):
    loss = engine(torch.ones(2, 3, 8, 8)).square().mean()
    engine.backward(loss)
    engine.step()


@pytest.fixture(scope="module")
def engine():
    from stereo.train.engine import init_distributed

    saved = dict(os.environ)
    os.environ["MASTER_PORT"] = str(free_port())
    init_distributed()  # sets RANK, WORLD_SIZE, MASTER_* in this process's environment ...
    yield _toy_engine()
    torch.distributed.destroy_process_group()
    os.environ.clear()  # ... which later tests' trainers would inherit, and the port is still held here
    os.environ.update(saved)


def _weights(engine):
    return {k: v.clone() for k, v in engine.module.state_dict().items()}


def test_rotation_keeps_last_and_every_kth_and_points_latest(engine, tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=2, rank=0)
    for step in range(1, 6):
        _step(engine)
        manager.save(engine, step, {"step": step}, "name: x\n")
    root = tmp_path / "checkpoints"
    assert complete_steps(root) == [2, 4, 5]
    assert (root / "latest").read_text().strip() == step_dir_name(5)
    assert not list(root.glob("*.tmp"))
    assert find_checkpoint(tmp_path) == root / step_dir_name(5)


def test_round_trip_restores_weights_and_trainer_state(engine, tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=None, rank=0)
    _step(engine)
    saved = _weights(engine)
    manager.save(engine, 7, {"step": 7, "note": "x"}, "name: x\n")
    _step(engine)
    assert any(not torch.equal(saved[k], v) for k, v in _weights(engine).items())
    step_dir, state = manager.resume(engine)
    assert step_dir == manager.latest() and state == {"step": 7, "note": "x"}
    assert all(torch.equal(saved[k], v) for k, v in _weights(engine).items())


def test_directory_without_marker_is_never_loaded_and_is_cleaned(engine, tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=None, rank=0)
    manager.save(engine, 1, {"step": 1}, "name: x\n")
    # a later save that was renamed but died before its marker, and one still under .tmp
    for name in (step_dir_name(2), step_dir_name(3) + ".tmp"):
        (tmp_path / "checkpoints" / name / "ds").mkdir(parents=True)
    assert manager.latest() == tmp_path / "checkpoints" / step_dir_name(1)
    assert manager.resume(engine)[0] == tmp_path / "checkpoints" / step_dir_name(1)
    manager.save(engine, 4, {"step": 4}, "name: x\n")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == [
        step_dir_name(1), step_dir_name(4)]


def test_find_checkpoint_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_checkpoint(tmp_path)


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, torch
    sys.path[:0] = [{repo!r}, {repo!r} + "/tests"]
    from tests.test_checkpoint import _toy_engine, _step
    from stereo.train.engine import init_distributed
    from stereo.train.checkpoint import CheckpointManager
    init_distributed()
    engine = _toy_engine(width=512)  # big enough that a save takes a while
    manager = CheckpointManager({run_dir!r}, keep_last=2, keep_every=None, rank=0)
    _step(engine)
    manager.save(engine, 1, {{"step": 1}}, "")
    torch.save(engine.module.state_dict(), {expected!r})
    print("saved", flush=True)
    _step(engine)
    while True:
        manager.save(engine, 2, {{"step": 2}}, "")
""")


def test_kill_during_save_leaves_previous_checkpoint_loadable(engine, tmp_path):
    run_dir, expected = tmp_path / "run", tmp_path / "expected.pt"
    script = _KILLED_WRITER.format(repo=str(REPO), run_dir=str(run_dir), expected=str(expected))
    env = {**os.environ, "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    for line in proc.stdout:  # DeepSpeed also prints to stdout
        if line.strip() == "saved":
            break
    assert proc.poll() is None, "the writer died before its first checkpoint"
    tmp_dir = run_dir / "checkpoints" / (step_dir_name(2) + ".tmp")
    deadline = time.time() + 120
    while not any(tmp_dir.glob("ds/*")) and time.time() < deadline:
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-write of step 2
    proc.wait()
    assert tmp_dir.exists(), "the kill should have landed during the write of step 2"
    manager = CheckpointManager(run_dir, keep_last=2, keep_every=None, rank=0)
    assert manager.latest() == run_dir / "checkpoints" / step_dir_name(1)
    assert not (run_dir / "checkpoints" / step_dir_name(2) / COMPLETE).exists()
    fresh = _toy_engine(width=512)
    assert manager.resume(fresh) == (manager.latest(), {"step": 1})
    want = torch.load(expected)
    assert all(torch.equal(want[k], v) for k, v in fresh.module.state_dict().items())


def test_damage_with_the_same_size_is_caught_by_the_checksum(engine, tmp_path):
    from stereo.train.checkpoint import CheckpointError

    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=None, rank=0)
    manager.save(engine, 1, {"step": 1}, "name: x\n")
    manager.save(engine, 2, {"step": 2}, "name: x\n")
    states = tmp_path / "checkpoints" / step_dir_name(2) / "ds" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{states}: checksum .* differs from the recorded"):
        find_checkpoint(tmp_path)
    step_dir, state = manager.resume(engine)
    assert step_dir.name == step_dir_name(1) and state == {"step": 1}


def test_tidy_repairs_a_kill_between_commit_and_rotation(engine, tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=None, rank=0)
    for step in (1, 2):
        manager.save(engine, step, {"step": step}, "name: x\n")
    root = tmp_path / "checkpoints"
    # step 3 committed, then killed before `latest` was replaced and before the rotation removed step 1
    shutil.copytree(root / step_dir_name(2), root / step_dir_name(3))
    (root / "latest.writing").write_text(step_dir_name(3) + "\n")
    manager.tidy()
    assert complete_steps(root) == [2, 3]
    assert (root / "latest").read_text().strip() == step_dir_name(3)
    assert not (root / "latest.writing").exists()


def test_guarded_adamw_clips_and_skips_non_finite_updates():
    from stereo.train.engine import GuardedAdamW

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = GuardedAdamW([weight], max_norm=1.0, lr=0.1)
    weight.grad = torch.tensor([3.0, 4.0, 0.0])
    optimizer.step()
    assert optimizer._global_grad_norm == 5.0 and not optimizer.overflow
    assert torch.allclose(weight.grad, torch.tensor([0.6, 0.8, 0.0]))  # clipped to norm 1 before the update
    after_good = weight.detach().clone()
    state = {k: v.clone() for k, v in optimizer.state[weight].items()}
    weight.grad = torch.tensor([1.0, float("nan"), 0.0])
    optimizer.step()
    assert optimizer.overflow and optimizer._global_grad_norm != optimizer._global_grad_norm
    assert torch.equal(weight.detach(), after_good)
    assert all(torch.equal(state[k], v) for k, v in optimizer.state[weight].items())  # moments untouched too


def test_zero_stage_0_reports_the_grad_norm_and_skips_a_non_finite_gradient(engine):
    import deepspeed

    from stereo.config import load_config
    from stereo.train.engine import deepspeed_config, grad_norm

    cfg = load_config("tiny", ["deepspeed.zero_stage=0", "data.batch_size=2"])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 3))
    from stereo.train.engine import GuardedAdamW

    optimizer = GuardedAdamW(model.parameters(), max_norm=cfg.optim.grad_clip, lr=1e-2)
    stage0, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, 1, "fp32"))
    _step(stage0)
    assert stage0.was_step_applied() and grad_norm(stage0) > 0
    before = _weights(stage0)
    loss = stage0(torch.ones(2, 3, 8, 8)).square().mean()  # a finite loss ...
    stage0.backward(loss)
    next(stage0.module.parameters()).grad[0] = float("inf")  # ... with a non-finite gradient
    stage0.step()
    assert not stage0.was_step_applied() and grad_norm(stage0) == float("inf")
    assert all(torch.equal(before[k], v) for k, v in _weights(stage0).items())


@pytest.mark.parametrize("manifest", [b"", b'{"step": 2, "fi', b"\xff\xfe\x00", b"{}"])
def test_unreadable_manifest_is_a_damaged_checkpoint_never_the_older_format(engine, tmp_path, capsys, manifest):
    """An empty COMPLETE (what a crash can leave) used to turn the checksum check off, and a damaged file then
    loaded silently (issue 22): the checkpoint is named as damaged and the older one is used."""
    from stereo.train.checkpoint import CheckpointError

    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=None, rank=0)
    manager.save(engine, 1, {"step": 1}, "name: x\n")
    manager.save(engine, 2, {"step": 2}, "name: x\n")
    newest = tmp_path / "checkpoints" / step_dir_name(2)
    (newest / COMPLETE).write_bytes(manifest)
    states = newest / "ds" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:-16])  # damaged too: without the check it would load
    with pytest.raises(CheckpointError, match=f"{newest / COMPLETE}: (damaged|unreadable) manifest"):
        find_checkpoint(tmp_path)
    step_dir, state = manager.resume(engine)
    assert step_dir.name == step_dir_name(1) and state == {"step": 1}
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is unusable: {newest / COMPLETE}: " in err
    assert f"resuming from the older checkpoint {tmp_path / 'checkpoints' / step_dir_name(1)} instead" in err


def test_checkpoint_of_the_older_format_still_loads(engine, tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=None, rank=0)
    manager.save(engine, 3, {"step": 3}, "name: x\n")
    (tmp_path / "checkpoints" / step_dir_name(3) / COMPLETE).write_text("3\n")  # before manifests existed
    assert manager.resume(engine)[1] == {"step": 3}


def test_latest_pointer_with_bytes_that_are_not_utf8_is_rewritten_and_read_as_missing(engine, tmp_path):
    """`latest` holding non-UTF-8 bytes made every restart exit 1 (issue 22); the readers of the pointer (the
    trainer's tidy, the Slurm job wrapper's log line, `make status`) treat it as missing."""
    from jobs.job import TrainingJob
    from jobs.manage import checkpoint_summary
    from stereo.train.run_files import read_latest

    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=None, rank=0)
    manager.save(engine, 1, {"step": 1}, "name: x\n")
    latest = tmp_path / "checkpoints" / "latest"
    for junk in (b"\xff\xfe\xfa\n", b"", b"step_0000"):
        latest.write_bytes(junk)
        assert read_latest(tmp_path / "checkpoints") is None
        assert checkpoint_summary(tmp_path).startswith("none yet")
        job = TrainingJob(python_args=[], cwd=str(tmp_path), run_dir=str(tmp_path), max_requeues=1, save_timeout_s=1)
        assert job._latest() == "none"
        manager.tidy()
        assert latest.read_text() == step_dir_name(1) + "\n"
