"""Checkpoint manager on a real DeepSpeed engine (a small conv net, one gloo process): atomic commit, rotation,
round trip, and a kill -9 during a save that leaves the previous checkpoint loadable."""

import os
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

    os.environ["MASTER_PORT"] = str(free_port())
    init_distributed()
    yield _toy_engine()
    torch.distributed.destroy_process_group()


def _weights(engine):
    return {k: v.clone() for k, v in engine.module.state_dict().items()}


def test_rotation_keeps_last_and_every_kth_and_points_latest(engine, tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=2, rank=0)
    for step in range(1, 6):
        _step(engine)
        manager.save(engine, step, {"step": step})
    root = tmp_path / "checkpoints"
    assert complete_steps(root) == [2, 4, 5]
    assert (root / "latest").read_text().strip() == step_dir_name(5)
    assert not list(root.glob("*.tmp"))
    assert find_checkpoint(tmp_path) == root / step_dir_name(5)


def test_round_trip_restores_weights_and_trainer_state(engine, tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=None, rank=0)
    _step(engine)
    saved = _weights(engine)
    manager.save(engine, 7, {"step": 7, "note": "x"})
    _step(engine)
    assert any(not torch.equal(saved[k], v) for k, v in _weights(engine).items())
    state = manager.load(engine, manager.latest())
    assert state == {"step": 7, "note": "x"}
    assert all(torch.equal(saved[k], v) for k, v in _weights(engine).items())


def test_directory_without_marker_is_never_loaded_and_is_cleaned(engine, tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=None, rank=0)
    manager.save(engine, 1, {"step": 1})
    # a later save that was renamed but died before its marker, and one still under .tmp
    for name in (step_dir_name(2), step_dir_name(3) + ".tmp"):
        (tmp_path / "checkpoints" / name / "ds").mkdir(parents=True)
    assert manager.latest() == tmp_path / "checkpoints" / step_dir_name(1)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        manager.load(engine, tmp_path / "checkpoints" / step_dir_name(2))
    manager.save(engine, 4, {"step": 4})
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
    manager.save(engine, 1, {{"step": 1}})
    torch.save(engine.module.state_dict(), {expected!r})
    print("saved", flush=True)
    _step(engine)
    while True:
        manager.save(engine, 2, {{"step": 2}})
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
    assert manager.load(fresh, manager.latest()) == {"step": 1}
    want = torch.load(expected)
    assert all(torch.equal(want[k], v) for k, v in fresh.module.state_dict().items())
