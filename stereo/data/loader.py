"""The trainer's data entry points: `build_train_loader` (batches, resumable) and `iter_val_samples`.

torch's DataLoader hands out batches round-robin over its workers, always in the same order. The main process
therefore keeps, per role, the state that came with the last batch it *consumed* and how many batches it consumed;
on restore, worker slot i takes role (i + consumed) % workers and starts from that role's state, so batches that
were prefetched but never consumed are produced again and the resumed run sees exactly the batches of the
uninterrupted one.
"""

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
STATE_VERSION = 1
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


class _RoleBatches(IterableDataset):
    """What one DataLoader worker runs: the batches of its role, each with the role's state after it."""

    def __init__(self, sources: list[DatasetSource], seed: int, rank: int, slots: int, num_roles: int,
                 batch_size: int, max_disp: float, max_bad_rate: float, transform: Transform | None,
                 states: dict[int, dict], offset: int):
        super().__init__()
        self.sources, self.seed, self.rank, self.slots, self.num_roles = sources, seed, rank, slots, num_roles
        self.batch_size, self.max_disp, self.transform = batch_size, max_disp, transform
        self.max_bad_rate = max_bad_rate
        self.states, self.offset = states, offset

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
        role = self.rank * self.slots + ((info.id if info else 0) + self.offset) % self.slots
        state = RoleState.from_dict(self.states[role]) if role in self.states else RoleState()
        stream = RoleStream(self.sources, role, self.num_roles, self.seed, self.max_bad_rate, state, self.transform)
        while True:
            batch: dict[str, Any] = collate([stream.next() for _ in range(self.batch_size)], self.max_disp)
            batch["_role"], batch["_state"] = role, state.to_dict()
            yield batch


class TrainLoader:
    """Endless training batches for one rank; `state_dict()` is small and JSON-able."""

    def __init__(self, sources: list[DatasetSource], *, seed: int, rank: int, world_size: int, num_workers: int,
                 batch_size: int, max_disp: float, max_bad_rate: float, transform: Transform | None):
        self.sources, self.seed, self.rank, self.world_size = sources, seed, rank, world_size
        self.num_workers, self.batch_size, self.max_bad_rate = num_workers, batch_size, max_bad_rate
        self.max_disp = max_disp
        self.transform = transform
        self.slots = max(num_workers, 1)
        self.num_roles = world_size * self.slots
        self.role_states: dict[int, dict] = {}
        self.consumed = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dataset = _RoleBatches(self.sources, self.seed, self.rank, self.slots, self.num_roles, self.batch_size,
                               self.max_disp, self.max_bad_rate, self.transform, dict(self.role_states),
                               self.consumed % self.slots)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=2 if self.num_workers else None)
        for batch in loader:
            self.role_states[int(batch.pop("_role"))] = batch.pop("_state")
            self.consumed += 1
            yield batch

    def _identity(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "rank": self.rank, "num_workers": self.num_workers,
                "seed": self.seed, "datasets": [s.name for s in self.sources]}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **self._identity(), "consumed": self.consumed,
                "roles": {str(role): state for role, state in sorted(self.role_states.items())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state: expected a dict with version {STATE_VERSION}, got "
                             f"{state.get('version') if isinstance(state, dict) else type(state).__name__}")
        for key, expected in self._identity().items():
            if state.get(key) != expected:
                raise ValueError(f"data loader state: saved with {key}={state.get(key)!r} but this run has "
                                 f"{expected!r}; exact resume needs the same world size, workers, seed and data "
                                 "sets (start the data stream afresh by not loading this state)")
        self.consumed = int(state["consumed"])
        self.role_states = {int(role): RoleState.from_dict(s).to_dict() for role, s in state["roles"].items()}

    def epochs(self) -> dict[str, int]:
        """The epoch each data set has reached on this rank (the furthest of its roles)."""
        reached = {source.name: 0 for source in self.sources}
        for state in self.role_states.values():
            for name, cursor in state["cursors"].items():
                reached[name] = max(reached.get(name, 0), cursor[0])
        return reached

    def bad_sample_counts(self) -> dict[str, int]:
        """Bad samples skipped so far, per reason, by the roles of this rank (up to the last consumed batch)."""
        totals: dict[str, int] = {}
        for state in self.role_states.values():
            for reason, count in state["bad"].items():
                totals[reason] = totals.get(reason, 0) + count
        return totals

    def retries(self) -> int:
        """Reconnects of remote reads (and re-runs of pipe: commands) so far by the roles of this rank."""
        return sum(state.get("retries", 0) for state in self.role_states.values())


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
                       world_size: int) -> TrainLoader:
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
                       max_bad_rate=data_cfg.max_bad_sample_rate, transform=transform)


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
