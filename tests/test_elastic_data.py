"""The job-level data order on real tar shards, without a model: a run that moves 2 -> 1 -> 3 processes (state
handed over through JSON, as a checkpoint does) trains on the same samples, step by step and augmented identically,
as an uninterrupted 2-process run; the worker count changes nothing; each rank opens only its own lanes' shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from stereo.config.schema import AugmentConfig, DataConfig, DatasetSpec
from stereo.data.loader import build_train_loader
from test_stream import write_shards

GLOBAL_BATCH = 6  # divisible by 1, 2 and 3 processes


def data_cfg(root: Path, batch_size: int, workers: int) -> DataConfig:
    return DataConfig(train=[DatasetSpec("a", str(root / "a"), 0.7), DatasetSpec("b", str(root / "b"), 0.3)],
                      batch_size=batch_size, num_workers=workers, seed=5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("elastic")
    write_shards(root / "a", [list(range(i * 8, i * 8 + 8)) for i in range(8)])
    write_shards(root / "b", [list(range(500 + i * 5, 505 + i * 5)) for i in range(2)])
    return root


def train_steps(root: Path, world: int, batch_size: int, workers: int, steps: int, saved: list[dict] | None,
                ) -> tuple[list[list[str]], list[dict]]:
    """Per step, the sorted 'key:digest of the augmented left image' of the global batch; the ranks' states."""
    grad_accum = GLOBAL_BATCH // (world * batch_size)
    per_step: list[list[str]] = [[] for _ in range(steps)]
    states = []
    for rank in range(world):
        loader = build_train_loader(data_cfg(root, batch_size, workers), AugmentConfig(crop=[32, 32]), 512, rank,
                                    world, grad_accum)
        if saved is not None:
            loader.load_state_dict(saved)
        batches = iter(loader)
        for step in range(steps):
            for _ in range(grad_accum):
                batch = next(batches)
                for key, image in zip(batch["keys"], batch["left"]):
                    per_step[step].append(f"{key}:{hashlib.sha1(image.numpy().tobytes()).hexdigest()[:12]}")
        states.append(json.loads(json.dumps(loader.state_dict())))
    return [sorted(keys) for keys in per_step], states


def test_moving_2_to_1_to_3_processes_trains_on_the_same_samples(shards: Path):
    straight, _ = train_steps(shards, 2, 1, 2, 9, None)
    first, saved = train_steps(shards, 2, 1, 2, 3, None)
    second, saved = train_steps(shards, 1, 2, 3, 3, saved)  # per-GPU batch 2, accumulation 3, three workers
    third, _ = train_steps(shards, 3, 1, 0, 3, saved)  # no loader workers
    moved = first + second + third
    assert [len(step) for step in moved] == [GLOBAL_BATCH] * 9
    for step, (want, got) in enumerate(zip(straight, moved)):
        assert want == got, f"step {step + 1}: the global batch differs after the moves"
    keys = [entry.split(":")[0] for step in straight for entry in step if entry.startswith("a/")]
    assert len(set(keys)) == len(keys) > 30  # data set a (64 samples) is still in its first epoch: none twice


def test_a_rank_reads_only_its_lanes_shards(shards: Path):
    """8 shards of data set a, 3 ranks of 2 lanes: a rank opens the shards its lanes were dealt, not all of them."""
    _, states = train_steps(shards, 3, 2, 1, 4, None)
    for rank, state in enumerate(states):
        opened = sum(lane["opened_shards"] for lane in state["lane_states"].values())
        assert 0 < opened < 8 + 2, f"rank {rank} opened {opened} shards"
