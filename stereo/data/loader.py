"""The trainer's data entry points: `build_train_loader` (micro-batches in the job's data order, resumable at any
world size; see TrainLoader) and `iter_val_samples`."""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import signal
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stereo.config.schema import AugmentConfig, DataConfig, DatasetSpec
from stereo.data.augment import Augmentor
from stereo.data.reader import FetchOptions, UnreadableSample, index_tar, iter_streamed, read_indexed
from stereo.data.remote import RetryPolicy, ShardCache
from stereo.data.shardlist import Shard, resolve_shards
from stereo.data.shards import read_manifest
from stereo.data.stream import DatasetSource, RoleState, RoleStream, Sample, Transform, decode_checked

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 2: per-lane states (1: per rank and worker)
PR_SET_PDEATHSIG = 1


def collate(samples: list[Sample], max_disp: float) -> dict[str, torch.Tensor]:
    """Samples -> the training batch; disparities at or beyond max_disp are marked invalid (and zeroed)."""
    disp = np.stack([s["disp"] for s in samples])[:, None]
    valid = np.stack([s["valid"] for s in samples])[:, None] & (disp < max_disp)

    def images(name: str) -> torch.Tensor:
        # NCHW contiguous here, in the worker, rather than in the training process
        return torch.from_numpy(np.ascontiguousarray(np.stack([s[name] for s in samples], dtype=np.float32)
                                                     .transpose(0, 3, 1, 2)))

    return {
        "left": images("left"),
        "right": images("right"),
        "disp": torch.from_numpy(np.where(valid, disp, 0).astype(np.float32)),
        "valid": torch.from_numpy(valid),
    }


def stop_workers(timeout_s: float = 5.0) -> None:
    """Kill this process's loader workers and reap them. They ignore SIGTERM, so multiprocessing's exit-time cleanup
    (SIGTERM, then an unbounded join) would wait for them forever: registered to run before it, and called by the
    trainer's exit path."""
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if workers and threading.current_thread() is threading.main_thread():
        # torch's DataLoader turns a worker's death into an exception in the main thread (its SIGCHLD handler),
        # which would escape the exit path with a traceback and exit 1: these deaths are ours
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(timeout_s)


atexit.register(stop_workers)  # atexit runs last-registered first: before multiprocessing's own cleanup


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies, however the parent dies (kill -9)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the DataLoader's watchdog still ends orphaned workers, more slowly


class _LaneSamples(IterableDataset):
    """What one DataLoader worker runs: its share of the rank's item sequence, one sample per item. Item I (counted
    over the whole run on this rank) is the next sample of lane `TrainLoader.lane_of(I)`; worker w of W makes the
    items I0 + w, I0 + w + W, ..., and since W divides blocks x per_rank each lane always falls to the same worker,
    which keeps its stream."""

    def __init__(self, loader: "TrainLoader", first_item: int, workers: int):
        super().__init__()
        self.loader, self.first_item, self.workers = loader, first_item, workers
        self.states = dict(loader.lane_states)  # as restored: the main process updates its own copy as it consumes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None:  # one core per worker: OpenCV and torch must not start their own thread pools
            cv2.setNumThreads(1)
            torch.set_num_threads(1)
            # Slurm signals every process of the job and a Ctrl-C the whole terminal group: the trainer saves on
            # SIGTERM/SIGINT, so its workers must outlive both. They end with the trainer: it kills them on every
            # exit (stereo.train.failures), and the kernel does if the trainer dies first (die_with_parent).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            die_with_parent()
        loader = self.loader
        streams: dict[int, RoleStream] = {}
        item = self.first_item + (info.id if info else 0)
        while True:
            lane = loader.lane_of(item)
            if lane not in streams:
                state = self.states.get(lane)
                streams[lane] = RoleStream(loader.sources, lane, loader.num_lanes, loader.seed, loader.max_bad_rate,
                                           RoleState.from_dict(state) if state else RoleState(), loader.transform)
            sample = streams[lane].next()
            out: dict[str, Any] = collate([sample], loader.max_disp)
            out["_lane"], out["_state"] = lane, streams[lane].state.to_dict()
            out["_key"] = f"{sample['dataset']}/{sample['key']}"
            yield out
            item += self.workers


class TrainLoader:
    """Endless micro-batches for one rank; `state_dict()` is small and JSON-able.

    The data order belongs to the job, not to its ranks. The job has lanes = data.lane_blocks x global batch
    (data.batch_size x train.grad_accum x world size), each an independent stream (stereo.data.stream, role = lane)
    whose shards, sample order and augmentation are drawn from (seed, lane, draw). Round t (one optimizer step) takes
    the next sample of each lane of block t % lane_blocks: lanes b * G ... b * G + G - 1. Rank r owns, in every block,
    the contiguous per_rank = batch_size x grad_accum lanes from r * per_rank; its micro-batch k of a round holds
    the lanes k * batch_size ... + batch_size of those. So neither the world size nor the worker count changes
    which samples a step trains on, only the global batch and lane_blocks do (a resume keeps both), and a rank opens
    only its own lanes' shards. The blocks exist for the loader's workers: a rank has lane_blocks x per_rank lanes,
    and every worker count dividing that number keeps each lane on one worker.

    torch's DataLoader hands out items round-robin over its workers. The main process keeps, per lane, the state
    that came with the last sample it *consumed*, and how many samples it consumed; prefetched items never
    consumed are produced again after a restore.
    """

    def __init__(self, sources: list[DatasetSource], *, seed: int, rank: int, world_size: int, num_workers: int,
                 batch_size: int, max_disp: float, max_bad_rate: float, transform: Transform | None,
                 grad_accum: int = 1, lane_blocks: int = 1):
        self.sources, self.seed, self.rank, self.world_size = sources, seed, rank, world_size
        self.num_workers, self.batch_size, self.grad_accum, self.max_bad_rate = (num_workers, batch_size, grad_accum,
                                                                                max_bad_rate)
        self.max_disp, self.transform, self.lane_blocks = max_disp, transform, lane_blocks
        self.per_rank = batch_size * grad_accum
        self.global_batch = self.per_rank * world_size
        self.num_lanes = self.global_batch * lane_blocks
        # the most workers, up to num_workers, that keep every lane on one worker
        self.workers = max(w for w in range(1, max(num_workers, 1) + 1) if (lane_blocks * self.per_rank) % w == 0)
        if num_workers > self.workers and rank == 0:
            log.warning("data.num_workers=%d: %d are used (a worker count must divide data.lane_blocks x "
                        "data.batch_size x train.grad_accum = %d)", num_workers, self.workers,
                        lane_blocks * self.per_rank)
        self.lane_states: dict[int, dict] = {}
        self.consumed = 0  # samples (items) consumed by this rank

    def lane_of(self, item: int) -> int:
        """The lane of this rank's item `item` (item = round x per_rank + slot)."""
        block = (item // self.per_rank) % self.lane_blocks
        return block * self.global_batch + self.rank * self.per_rank + item % self.per_rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = _LaneSamples(self, self.consumed, self.workers)
        workers = self.workers if self.num_workers else 0
        items = iter(DataLoader(dataset, batch_size=None, num_workers=workers,
                                prefetch_factor=2 * self.batch_size if workers else None))
        while True:
            parts = [next(items) for _ in range(self.batch_size)]
            batch: dict[str, Any] = {name: torch.cat([part[name] for part in parts])
                                     for name in ("left", "right", "disp", "valid")}
            batch["keys"] = [part["_key"] for part in parts]  # "data set/key" of each sample
            # where the micro-batch sits in the job's order (its first sample's lane and draw): seeds the model's own
            # randomness (dropout), so that it too is the same at any world size when data.batch_size is kept
            batch["origin"] = (int(parts[0]["_lane"]), int(parts[0]["_state"]["draws"]))
            for part in parts:
                self.lane_states[int(part["_lane"])] = part["_state"]
            self.consumed += self.batch_size
            yield batch

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "datasets": [s.name for s in self.sources], "lane_blocks": self.lane_blocks}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **self._identity(), "lanes": self.num_lanes, "rank": self.rank,
                "world_size": self.world_size, "per_rank": self.per_rank, "consumed_samples": self.consumed,
                "lane_states": {str(lane): state for lane, state in sorted(self.lane_states.items())}}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """This rank's own saved state, or the saved states of all ranks of an earlier start at another world size
        (each lane continues where it stopped, whichever rank owned it)."""
        states = state if isinstance(state, list) else [state]
        if all(isinstance(saved, dict) and saved.get("version") == 1 for saved in states):
            log.warning("data loader state: saved by an older version (per rank and worker, not per lane); the data "
                        "order starts afresh from this checkpoint (samples may repeat within the current epoch)")
            return
        for saved in states:
            if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
                raise ValueError(f"data loader state: expected a dict with version {STATE_VERSION}, got "
                                 f"{saved.get('version') if isinstance(saved, dict) else type(saved).__name__}")
            for key, expected in (*self._identity().items(), ("lanes", self.num_lanes)):
                if saved.get(key) != expected:
                    raise ValueError(f"data loader state: saved with {key}={saved.get(key)!r} but this run has "
                                     f"{expected!r}; resuming the data order needs the same seed, data sets, "
                                     "data.lane_blocks and global batch (data.batch_size x train.grad_accum x "
                                     "processes)")
        mine = {self.lane_of(item) for item in range(self.lane_blocks * self.per_rank)}
        self.lane_states = {int(lane): RoleState.from_dict(s).to_dict() for saved in states
                            for lane, s in saved["lane_states"].items() if int(lane) in mine}
        first = states[0]
        if (first["world_size"], first["per_rank"]) == (self.world_size, self.per_rank):
            self.consumed = int(next(s for s in states if s["rank"] == self.rank)["consumed_samples"])
        else:
            # another layout starts at the round where the old one was (a round cut short by a dropped micro-batch
            # is started again: its lanes that already gave their sample give their next one, so no lane repeats
            # or skips a sample)
            self.consumed = int(first["consumed_samples"]) // first["per_rank"] * self.per_rank

    def epochs(self) -> dict[str, int]:
        """The epoch each data set has reached on this rank (the furthest of its lanes)."""
        reached = {source.name: 0 for source in self.sources}
        for state in self.lane_states.values():
            for name, cursor in state["cursors"].items():
                reached[name] = max(reached.get(name, 0), cursor[0])
        return reached

    def bad_sample_counts(self) -> dict[str, int]:
        """Bad samples skipped so far, per reason, by the lanes of this rank (up to the last consumed batch)."""
        totals: dict[str, int] = {}
        for state in self.lane_states.values():
            for reason, count in state["bad"].items():
                totals[reason] = totals.get(reason, 0) + count
        return totals

    def retries(self) -> int:
        """Reconnects of remote reads (and re-runs of pipe: commands) so far by the lanes of this rank."""
        return sum(state.get("retries", 0) for state in self.lane_states.values())


def fetch_options(data_cfg: DataConfig) -> FetchOptions:
    cache = ShardCache(data_cfg.cache_dir, int(data_cfg.cache_gb * 1e9)) if data_cfg.cache_dir else None
    return FetchOptions(RetryPolicy(data_cfg.shard_retries, data_cfg.retry_backoff_s, data_cfg.read_timeout_s), cache,
                        data_cfg.max_failed_shard_rate)


def sources_from_specs(specs: list[DatasetSpec], fetch: FetchOptions = FetchOptions()) -> list[DatasetSource]:
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"data set names must be unique (they seed the shard order): {names}")
    return [DatasetSource(spec.name, resolve_shards(spec.shards), spec.weight, fetch) for spec in specs]


def build_train_loader(data_cfg: DataConfig, augment_cfg: AugmentConfig | None, max_disp: int, rank: int,
                       world_size: int, grad_accum: int = 1) -> TrainLoader:
    """`augment_cfg=None` turns augmentation off (samples keep their full size, so batch_size must be 1 unless
    all samples share a size)."""
    if not data_cfg.train:
        raise ValueError("data.train: at least one data set, got none")
    transform = Augmentor(augment_cfg, max_disp) if augment_cfg is not None else None
    sources = sources_from_specs(data_cfg.train, fetch_options(data_cfg))
    if augment_cfg is not None and augment_cfg.hflip_prob > 0 and rank == 0:
        warn_unflippable(sources, augment_cfg.hflip_prob)
    return TrainLoader(sources, seed=data_cfg.seed, rank=rank, world_size=world_size,
                       num_workers=data_cfg.num_workers, batch_size=data_cfg.batch_size, max_disp=max_disp,
                       max_bad_rate=data_cfg.max_bad_sample_rate, transform=transform, grad_accum=grad_accum,
                       lane_blocks=data_cfg.lane_blocks)


def warn_unflippable(sources: list[DatasetSource], hflip_prob: float) -> None:
    """The view-swap flip needs the right view's disparity; say once per data set when its samples have none
    (judged by the first sample; pipe: sources are not opened for this)."""
    for source in sources:
        names = _first_member_names(source.shards[0], source.fetch)
        if names is not None and not any(n.startswith(("disp_right.", "depth_right.")) for n in names):
            log.warning("augment.hflip_prob=%g does not apply to data set %r: its samples have no right-view "
                        "disparity (disp_right.*), so they are never flipped", hflip_prob, source.name)


def _first_member_names(shard: Shard, fetch: FetchOptions) -> list[str] | None:
    try:
        if shard.is_pipe:
            return None
        if shard.is_streamed:
            with closing(iter_streamed(shard.url, 0, fetch)) as items:
                first = next(items, None)
            return list(first[1]) if isinstance(first, tuple) else None
        samples = index_tar(shard.url).samples
        return list(samples[0].members) if samples else None
    except (UnreadableSample, OSError):  # a broken shard is reported when it is read, not here
        return None


def iter_val_samples(data_cfg: DataConfig) -> Iterator[Sample]:
    """Each held-out sample once, in shard order, full size; capped by `data_cfg.val_samples`. Bad ones are skipped
    with a warning (validation must not die on one broken file, nor silently shrink)."""
    remaining = data_cfg.val_samples
    for source in sources_from_specs(data_cfg.val, fetch_options(data_cfg)):
        for shard in source.shards:
            for item in _shard_samples(shard, source.fetch):
                if remaining is not None and remaining <= 0:
                    return
                if isinstance(item, UnreadableSample):
                    log.warning("validation: skipped a sample of %s (%s)", shard.url, item)
                    continue
                item["dataset"] = source.name
                yield item
                if remaining is not None:
                    remaining -= 1


def count_val_samples(data_cfg: DataConfig) -> int | None:
    """How many samples `iter_val_samples` yields, from the shards' manifests (None when one has no manifest)."""
    total = 0
    for spec in data_cfg.val:
        manifest = read_manifest(spec.shards) if Path(spec.shards).is_dir() else None
        if manifest is None:
            return None
        total += manifest["num_samples"]
    return total if data_cfg.val_samples is None else min(total, data_cfg.val_samples)


def _shard_samples(shard: Shard, fetch: FetchOptions) -> Iterator[Sample | UnreadableSample]:
    """Every sample of one shard in stored order (raw items are (key, members, ...))."""
    if shard.is_streamed:
        raw = iter_streamed(shard.url, 0, fetch)
    else:
        try:
            index = index_tar(shard.url)
        except UnreadableSample as bad:
            yield bad
            return
        raw = _read_all(index)
    for item in raw:
        if isinstance(item, UnreadableSample):
            yield item
            continue
        try:
            yield decode_checked(item[1], item[0])
        except UnreadableSample as bad:
            yield bad


def _read_all(index) -> Iterator[tuple[str, dict[str, bytes]] | UnreadableSample]:
    with open(index.path, "rb") as handle:
        for entry in index.samples:
            try:
                yield entry.key, read_indexed(handle, index, entry)
            except UnreadableSample as bad:
                yield bad
