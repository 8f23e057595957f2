"""The training stream and loader on real tar shards: sources, split, mixing, exact resume, bad data."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from stereo.config.schema import AugmentConfig, DataConfig, DatasetSpec
from stereo.data.codecs import encode_pfm, encode_png
from stereo.data.loader import build_train_loader, iter_val_samples, sources_from_specs
from stereo.data.reader import FetchOptions
from stereo.data.remote import RetryPolicy
from stereo.data.shardlist import ShardListError, resolve_shards
from stereo.data.stream import BadDataError, DatasetSource, RoleState, RoleStream

SIZE = (24, 40)  # H, W of the synthetic samples


def members_for(ident: int) -> dict[str, bytes]:
    """A small sample whose constant disparity (ident + 1) identifies it after decoding."""
    rng = np.random.default_rng(ident)
    image = rng.integers(0, 256, SIZE + (3,), dtype=np.uint8)
    return {"left.png": encode_png(image), "right.png": encode_png(image),
            "disp.pfm": encode_pfm(np.full(SIZE, ident + 1.0, np.float32)), "meta.json": b'{"source": "test"}'}


def write_shards(directory: Path, groups: list[list[int]], damage: dict[int, dict[str, bytes]] | None = None,
                 manifest: bool = True) -> list[Path]:
    """One tar per group of sample ids (webdataset's own writer), plus a manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    paths, entries = [], []
    for index, ids in enumerate(groups):
        path = directory / f"{index:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for ident in ids:
                members = (damage or {}).get(ident, members_for(ident))
                sink.write({"__key__": f"s{ident:05d}", **members})
        paths.append(path)
        entries.append({"name": path.name, "num_samples": len(ids), "bytes": path.stat().st_size, "sha256": ""})
    if manifest:
        (directory / "manifest.json").write_text(json.dumps({"dataset": directory.name, "shards": entries}))
    return paths


def ident_of(sample: dict) -> int:
    return int(round(float(sample["disp"][0, 0]))) - 1


def role_stream(source: DatasetSource | list[DatasetSource], role=0, roles=1, seed=0, state=None, rate=0.5):
    sources = source if isinstance(source, list) else [source]
    return RoleStream(sources, role, roles, seed, rate, state or RoleState(), None)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("shards") / "set"
    write_shards(directory, [list(range(i * 5, i * 5 + 5)) for i in range(3)])
    return directory


def test_sources_resolve_manifest_brace_list_and_pipe(shard_dir: Path, tmp_path: Path):
    from_manifest = resolve_shards(str(shard_dir))
    assert [Path(s.url).name for s in from_manifest] == ["000000.tar", "000001.tar", "000002.tar"]
    assert [s.num_samples for s in from_manifest] == [5, 5, 5]
    assert [s.url for s in resolve_shards(f"{shard_dir}/{{000000..000002}}.tar")] == [s.url for s in from_manifest]
    listing = tmp_path / "shards.txt"
    listing.write_text("# two shards\n" + "\n".join(s.url for s in from_manifest[:2]) + "\n")
    assert len(resolve_shards(str(listing))) == 2
    piped = resolve_shards(f"pipe:cat {shard_dir}/{{000000..000001}}.tar")
    assert [s.url for s in piped] == [f"pipe:cat {shard_dir}/00000{i}.tar" for i in range(2)]
    assert all(s.is_pipe for s in piped)
    with pytest.raises(ShardListError, match="7 of 10 .*000003.tar"):
        resolve_shards(f"{shard_dir}/{{000000..000009}}.tar")
    with pytest.raises(ShardListError, match="manifest.json"):
        resolve_shards(str(tmp_path))


def test_pipe_source_reads_and_resumes_like_a_stream(shard_dir: Path):
    source = DatasetSource("p", resolve_shards(f"pipe:cat {shard_dir}/{{000000..000002}}.tar"), 1.0)
    straight = role_stream(source)
    idents = [ident_of(straight.next()) for _ in range(15)]
    assert sorted(idents) == list(range(15))  # one epoch: every sample once
    first = role_stream(source)
    head = [ident_of(first.next()) for _ in range(7)]
    resumed = role_stream(source, state=RoleState.from_dict(json.loads(json.dumps(first.state.to_dict()))))
    assert head + [ident_of(resumed.next()) for _ in range(8)] == idents


def test_no_duplicates_within_an_epoch_across_ranks_and_workers(shard_dir: Path):
    """3 shards, 4 roles (2 ranks x 2 workers): shards are split into parts so every role gets work."""
    source = sources_from_specs([DatasetSpec("set", str(shard_dir))])[0]
    seen: dict[int, list[int]] = {0: [], 1: []}
    for role in range(4):
        stream = role_stream(source, role=role, roles=4)
        while True:
            ident = ident_of(stream.next())
            epoch = stream.state.cursors["set"][0]
            if epoch > 1:
                break
            seen[epoch].append(ident)
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == list(range(15)), f"epoch {epoch}: {sorted(seen[epoch])}"


def test_epochs_reshuffle(shard_dir: Path):
    source = sources_from_specs([DatasetSpec("set", str(shard_dir))])[0]
    stream = role_stream(source)
    epochs = [[ident_of(stream.next()) for _ in range(15)] for _ in range(3)]
    assert all(sorted(e) == list(range(15)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    other_seed = role_stream(source, seed=1)
    assert [ident_of(other_seed.next()) for _ in range(15)] != epochs[0]


def test_mixing_follows_weights(tmp_path: Path):
    big = write_shards(tmp_path / "a", [list(range(0, 20))])
    small = write_shards(tmp_path / "b", [list(range(100, 120))])
    sources = [DatasetSource("a", resolve_shards(str(big[0])), 0.8),
               DatasetSource("b", resolve_shards(str(small[0])), 0.2)]
    stream = role_stream(sources)
    picks = [stream.next()["dataset"] for _ in range(500)]
    share = picks.count("a") / len(picks)
    assert 0.75 < share < 0.85


def _take(loader, count: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise AssertionError("the loader ended")


@pytest.mark.parametrize("world_size", [1, 2])
def test_exact_resume_with_two_workers(tmp_path: Path, world_size: int):
    """N batches straight == k batches, state_dict, new loader, load_state_dict, N-k batches (augmented)."""
    write_shards(tmp_path / "a", [list(range(i * 6, i * 6 + 6)) for i in range(3)])
    write_shards(tmp_path / "b", [list(range(100, 106))])
    cfg = DataConfig(train=[DatasetSpec("a", str(tmp_path / "a"), 0.7), DatasetSpec("b", str(tmp_path / "b"), 0.3)],
                     batch_size=2, num_workers=2, seed=3)
    augment = AugmentConfig(crop=[32, 32])
    total, split = 7, 3  # an odd split: the restored loader must start on the second worker's role
    for rank in range(world_size):
        straight = _take(build_train_loader(cfg, augment, 512, rank, world_size), total)
        first = build_train_loader(cfg, augment, 512, rank, world_size)
        head = _take(first, split)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = build_train_loader(cfg, augment, 512, rank, world_size)
        resumed.load_state_dict(state)
        tail = _take(resumed, total - split)
        for index, (a, b) in enumerate(zip(straight, head + tail)):
            for key in ("left", "right", "disp", "valid"):
                assert torch.equal(a[key], b[key]), f"rank {rank} batch {index} {key} differs after resume"
        assert straight[0]["left"].shape == (2, 3, 32, 32) and straight[0]["valid"].dtype == torch.bool
    # the worker count is no part of the data order: one worker resumes the two workers' state identically
    one_worker = build_train_loader(DataConfig(train=cfg.train, batch_size=2, num_workers=1, seed=3), augment, 512,
                                    world_size - 1, world_size)
    one_worker.load_state_dict(state)
    assert all(torch.equal(a["left"], b["left"]) for a, b in zip(straight[split:], _take(one_worker, total - split)))
    mismatched = build_train_loader(DataConfig(train=cfg.train, batch_size=4, num_workers=1, seed=3), augment, 512,
                                    world_size - 1, world_size)
    with pytest.raises(ValueError, match="global batch"):
        mismatched.load_state_dict(state)


def test_bad_samples_are_skipped_counted_and_fail_above_the_rate(tmp_path: Path, caplog):
    nan_disp = {**members_for(1), "disp.pfm": encode_pfm(np.full(SIZE, np.nan, np.float32))}
    corrupt_jpeg = {**members_for(2), "left.jpg": b"\xff\xd8\xff\xe0 not really a jpeg"}
    del corrupt_jpeg["left.png"]
    missing_right = {k: v for k, v in members_for(3).items() if k != "right.png"}
    empty_left = {**members_for(4), "left.png": b""}  # OpenCV raises cv2.error on an empty buffer
    paths = write_shards(tmp_path / "bad", [list(range(0, 10)), list(range(10, 20))],
                         damage={1: nan_disp, 2: corrupt_jpeg, 3: missing_right, 4: empty_left})
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # truncated in the middle of a sample
    source = sources_from_specs([DatasetSpec("bad", str(tmp_path / "bad"))])[0]
    stream = role_stream(source, rate=0.6)
    good = []
    while True:
        ident = ident_of(stream.next())
        if stream.state.cursors["bad"][0] > 0:
            break
        good.append(ident)
    counts = dict(stream.state.bad)
    assert set(good).isdisjoint({1, 2, 3, 4}) and len(set(good)) == len(good)
    assert counts["invalid_disparity"] == 1 and counts["undecodable"] == 2 and counts["missing_member"] == 1
    assert counts["truncated"] >= 3
    assert len(good) + sum(counts.values()) == 20  # every sample of the epoch either read or counted once

    logged = [r.getMessage() for r in caplog.records if "skipped a bad sample" in r.getMessage()]
    assert any("(undecodable)" in m and "bad/000000.tar: s00004: s00004.left.png: empty (0 bytes)" in m
               for m in logged), logged  # the shard and the key, beside the counts
    assert all("role 0 has skipped {" in m for m in logged)

    strict = role_stream(source, rate=0.01)
    with pytest.raises(BadDataError, match=r"shard .*/bad/00000[01]\.tar"):
        for _ in range(20):
            strict.next()


def test_val_samples_in_order_once_and_capped(shard_dir: Path):
    cfg = DataConfig(val=[DatasetSpec("v", str(shard_dir))])
    assert [ident_of(s) for s in iter_val_samples(cfg)] == list(range(15))
    cfg.val_samples = 4
    samples = list(iter_val_samples(cfg))
    assert [s["key"] for s in samples] == [f"s{i:05d}" for i in range(4)]
    assert samples[0]["left"].shape == SIZE + (3,) and samples[0]["dataset"] == "v"


def test_failing_pipe_commands_are_retried_then_counted_as_failed_shards(shard_dir: Path):
    """A command that fails is run again and the samples it already gave are skipped (none lost, none twice);
    after the retry budget the shard counts as failed and the stream goes on; a second failure above the rate
    stops with BadDataError."""
    fetch = FetchOptions(RetryPolicy(retries=2, backoff_s=0.01), max_failed_rate=0.5)
    dies_after = DatasetSource("p", resolve_shards(f"pipe:cat {shard_dir}/000000.tar; exit 3"), 1.0, fetch)
    stream = role_stream(dies_after)
    assert sorted(ident_of(stream.next()) for _ in range(5)) == list(range(5))
    stream.next()  # the next epoch starts after the failure was counted
    assert stream.state.bad == {"failed_shards": 1}
    missing = DatasetSource("m", resolve_shards("pipe:cat /nonexistent/000000.tar"), 1.0, fetch)
    with pytest.raises(BadDataError, match="2 of 2 shards .*nonexistent/000000.tar: exit status 1 .*No such file"):
        role_stream(missing).next()


def test_workers_outlive_a_sigterm_to_the_process_group(tmp_path: Path):
    """Slurm sends SIGTERM to every process of a job; the trainer saves on it, so its loader workers must not die."""
    write_shards(tmp_path / "a", [list(range(6))])
    cfg = DataConfig(train=[DatasetSpec("a", str(tmp_path / "a"))], batch_size=1, num_workers=1)
    it = iter(build_train_loader(cfg, AugmentConfig(crop=[32, 32]), 512, 0, 1))
    next(it)
    workers = multiprocessing.active_children()
    assert workers, "expected a DataLoader worker process"
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stands in for the trainer's own handler
    try:
        for proc in workers:
            os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert all(proc.is_alive() for proc in workers)
        for _ in range(3):
            assert next(it)["left"].shape == (1, 3, 32, 32)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_flip_without_right_disparity_is_logged_once_per_data_set(tmp_path: Path, caplog):
    write_shards(tmp_path / "plain", [list(range(4))])
    with_right = {i: {**members_for(i), "disp_right.pfm": members_for(i)["disp.pfm"]} for i in range(10, 14)}
    write_shards(tmp_path / "right", [list(range(10, 14))], damage=with_right)
    cfg = DataConfig(train=[DatasetSpec(name, str(tmp_path / name)) for name in ("plain", "right")], num_workers=0)
    with caplog.at_level("WARNING"):
        build_train_loader(cfg, AugmentConfig(crop=[32, 32], hflip_prob=0.5), 512, 0, 1)
        build_train_loader(cfg, AugmentConfig(crop=[32, 32], hflip_prob=0.5), 512, 1, 2)  # other ranks stay quiet
        build_train_loader(cfg, AugmentConfig(crop=[32, 32]), 512, 0, 1)
    flips = [r.getMessage() for r in caplog.records if "hflip_prob" in r.getMessage()]
    assert flips == ["augment.hflip_prob=0.5 does not apply to data set 'plain': its samples have no right-view "
                     "disparity (disp_right.*), so they are never flipped"]


def test_bad_sample_log_is_rate_limited(caplog):
    """The first 5 per reason, then every 100th: a broken data set cannot flood the log, and counts stay exact."""
    from stereo.data.stream import count_bad

    state = RoleState()
    with caplog.at_level("WARNING"):
        for index in range(250):
            count_bad(state, 2, "undecodable", 1, f"shards/x/000001.tar: key{index}: broken")
        count_bad(state, 2, "truncated", 40, "shards/x/000002.tar: 40 samples missing from the end")
    messages = [r.getMessage() for r in caplog.records]
    keys = [m.split(": ")[2] for m in messages if "(undecodable)" in m]
    assert keys == ["key0", "key1", "key2", "key3", "key4", "key99", "key199"]
    assert "from now on every 100th is logged" in messages[4] and "every 100th" not in messages[3]
    assert state.bad == {"undecodable": 250, "truncated": 40} and sum("(truncated)" in m for m in messages) == 1


@pytest.mark.parametrize("key,value", [("shard_retries", -1), ("retry_backoff_s", -0.5),
                                       ("max_failed_shard_rate", 1.5), ("cache_gb", 0.0)])
def test_remote_reading_keys_are_validated(key: str, value: float):
    from stereo.config.errors import ConfigError

    with pytest.raises(ConfigError, match=f"data.{key}"):
        DataConfig(**{key: value}).validate()
