"""The training sample stream: weighted mixing of data sets, split across roles, resumable from small integers.

A *role* is one lane of the job's sample sequence: the trainer has one lane per sample of the global batch, and
optimizer step s trains on the s-th sample of every lane (stereo.data.loader.TrainLoader), whatever the world
size and the number of loader workers. Each role owns a plan that is a pure function of (seed, data set, epoch,
role):

* per data set and epoch the shards are put in an order drawn from (seed, data set, epoch); when there are fewer
  shards than roles each shard is split into `parts` interleaved slices (sample i belongs to part i % parts), so
  there are always at least as many *units* (shard, part) as roles; units are dealt to roles round-robin, so no
  sample is read twice within an epoch across all lanes;
* inside a local shard the samples are visited in an order drawn from (seed, data set, epoch, shard); remote
  objects and `pipe:` streams are read in stream order (a resumed remote read starts at the byte offset after the
  last sample consumed, a pipe skips that many samples);
* the data set of draw n is chosen with the config weights by a generator seeded from (seed, role, n), and the
  augmentation of draw n uses its own generator from (seed, role, n), never the worker id alone.

Each data set advances through its own epochs (infinite resampling). The whole state of a role is
`RoleState`: the draw count, per data set [epoch, unit, position in unit, bad samples in unit, byte offset of a
remote stream], the bad-sample counters and the number of shards opened; a role rebuilt from it continues exactly
where it stopped.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stereo.data.codecs import CodecError
from stereo.data.reader import FetchOptions, ShardFailed, UnreadableSample, index_tar, iter_streamed, read_indexed
from stereo.data.sample import decode_sample
from stereo.data.shardlist import Shard

log = logging.getLogger(__name__)
Sample = dict[str, Any]
# (sample, generator) -> augmented sample, or None when no usable crop exists
Transform = Callable[[Sample, np.random.Generator], Sample | None]


class BadDataError(RuntimeError):
    """Too many unreadable samples in one shard: the data set needs repair, training stops."""


@dataclass(frozen=True)
class DatasetSource:
    name: str
    shards: list[Shard]
    weight: float
    fetch: FetchOptions = FetchOptions()


@dataclass
class RoleState:
    draws: int = 0
    # name -> [epoch, unit, position, bad in unit, byte offset after the last sample of a remote stream (0: none)]
    cursors: dict[str, list[int]] = field(default_factory=dict)
    bad: dict[str, int] = field(default_factory=dict)  # reason -> samples (failed_shards: shards)
    opened_shards: int = 0
    retries: int = 0  # reconnects of remote reads and re-runs of pipe: commands

    def to_dict(self) -> dict:
        return {"draws": self.draws, "cursors": {k: list(v) for k, v in self.cursors.items()}, "bad": dict(self.bad),
                "opened_shards": self.opened_shards, "retries": self.retries}

    @classmethod
    def from_dict(cls, data: dict) -> "RoleState":
        return cls(int(data["draws"]), {k: [int(x) for x in v] for k, v in data["cursors"].items()},
                   {k: int(v) for k, v in data["bad"].items()}, int(data.get("opened_shards", 0)),
                   int(data.get("retries", 0)))


def name_hash(name: str) -> int:
    return zlib.crc32(name.encode())


def epoch_units(num_shards: int, num_roles: int, role: int, seed: int, dataset: str, epoch: int,
                ) -> list[tuple[int, int, int]]:
    """This role's units for one epoch of a data set: (shard index, part, parts)."""
    parts = math.ceil(num_roles / num_shards)
    order = np.random.default_rng([seed, name_hash(dataset), epoch]).permutation(num_shards)
    units = [(int(shard), part, parts) for shard in order for part in range(parts)]
    return units[role::num_roles]


def sample_order(num_samples: int, seed: int, dataset: str, epoch: int, shard: int, part: int, parts: int,
                 ) -> list[int]:
    """Visit order of a local shard's samples in this unit (pipe: streams are read in stream order instead)."""
    order = np.random.default_rng([seed, name_hash(dataset), epoch, shard]).permutation(num_samples)
    return [int(i) for i in order if i % parts == part]


def draw_generator(seed: int, role: int, draw: int, purpose: int) -> np.random.Generator:
    """Counter-based randomness: the same (seed, role, draw) gives the same numbers in any process, any time."""
    return np.random.default_rng([seed, role, draw, purpose])


CHOOSE_DATASET, AUGMENT = 0, 1
CURSOR_LENGTH = 5
MAX_CROP_FAILURES = 50  # consecutive samples without a usable crop before the stream gives up


class DatasetCursor:
    """Walks one data set's plan for one role, skipping and counting bad samples."""

    def __init__(self, source: DatasetSource, role: int, num_roles: int, seed: int, max_bad_rate: float,
                 state: RoleState):
        self.source, self.role, self.num_roles, self.seed = source, role, num_roles, seed
        self.max_bad_rate, self.state = max_bad_rate, state
        self.cursor = state.cursors.setdefault(source.name, [0, 0, 0, 0, 0])
        self.cursor.extend([0] * (CURSOR_LENGTH - len(self.cursor)))  # a state saved before the byte offset
        self._open_key: tuple[int, int] | None = None  # (epoch, unit) whose reader is open
        self._reader: Iterator[Sample | UnreadableSample] | None = None
        self._unit_size: int | None = None
        self._units_epoch, self._epoch_units = -1, []
        self.current_shard = ""  # the URL of the shard being read

    def next(self) -> Sample:
        epochs_without_sample = 0
        while True:
            epoch, unit_index = self.cursor[:2]
            units = self._units(epoch)
            if unit_index >= len(units):
                epochs_without_sample += 1
                if epochs_without_sample > 2:
                    raise BadDataError(f"data set {self.source.name!r}: role {self.role} of {self.num_roles} found "
                                       "no readable sample in whole epochs (fewer samples than roles?)")
                self.cursor[:] = [epoch + 1, 0, 0, 0, 0]
                continue
            if (epoch, unit_index) != self._open_key:
                self._open(epoch, unit_index, units[unit_index])
            item = next(self._reader, None)
            if item is None:
                self._finish_unit()
                continue
            self.cursor[2] += 1
            if isinstance(item, ShardFailed):
                self._count_failed_shard(item)
                continue
            if isinstance(item, UnreadableSample):
                self._count_bad(item)
                continue
            return item

    def _units(self, epoch: int) -> list[tuple[int, int, int]]:
        if self._units_epoch != epoch:
            self._units_epoch = epoch
            self._epoch_units = epoch_units(len(self.source.shards), self.num_roles, self.role, self.seed,
                                            self.source.name, epoch)
        return self._epoch_units

    def _open(self, epoch: int, unit_index: int, unit: tuple[int, int, int]) -> None:
        shard_index, part, parts = unit
        shard = self.source.shards[shard_index]
        self._open_key, self.current_shard = (epoch, unit_index), shard.url
        position = self.cursor[2]
        if position == 0:
            self.state.opened_shards += 1
        if shard.is_streamed:
            self._unit_size = None
            self._reader = self._streamed_samples(shard, part, parts, position)
            return
        try:
            index = index_tar(shard.url)
        except (UnreadableSample, OSError) as exc:
            self._unit_size = 1
            bad = exc if isinstance(exc, UnreadableSample) else UnreadableSample("unreadable_shard", str(exc))
            self._reader = iter([bad])
            return
        order = sample_order(len(index.samples), self.seed, self.source.name, epoch, shard_index, part, parts)
        # Samples whose headers were lost to truncation (the manifest knows how many there were) count once, as
        # the unit's first visit, so that positions stay the same on resume.
        missing = max(0, (shard.num_samples or 0) - len(index.samples)) if part == 0 else 0
        visits: list[int | None] = ([None] if missing else []) + order
        self._unit_size = len(order) + missing
        self._reader = self._local_samples(index, visits[position:], missing)

    def _local_samples(self, index, visits: list[int | None], missing: int) -> Iterator[Sample | UnreadableSample]:
        with open(index.path, "rb") as handle:
            for i in visits:
                if i is None:
                    yield UnreadableSample("truncated", f"{index.path}: {missing} samples missing from the end",
                                           count=missing)
                    continue
                entry = index.samples[i]
                try:
                    yield decode_checked(read_indexed(handle, index, entry), entry.key)
                except UnreadableSample as bad:
                    yield bad

    def _streamed_samples(self, shard: Shard, part: int, parts: int, position: int,
                          ) -> Iterator[Sample | UnreadableSample]:
        """Stream order; sample i belongs to part i % parts. A resumed remote read starts at the byte offset kept
        in the cursor, which is where stream sample (position - 1) * parts + part + 1 begins."""
        offset = self.cursor[4] if position else 0
        index = (position - 1) * parts + part + 1 if offset else 0
        selected = position if offset else 0
        for item in iter_streamed(shard.url, offset, self.source.fetch, self._count_retry):
            if isinstance(item, UnreadableSample):
                self._unit_size = selected + 1
                yield item
                return
            key, members, end = item
            index += 1
            if (index - 1) % parts != part:
                continue
            selected += 1
            if selected <= position:
                continue
            if not shard.is_pipe:
                self.cursor[4] = end  # consumed together with this sample (next() advances the position)
            try:
                yield decode_checked(members, key)
            except UnreadableSample as bad:
                yield bad
        self._unit_size = selected

    def _count_retry(self) -> None:
        self.state.retries += 1

    def _count_bad(self, bad: UnreadableSample) -> None:
        count_bad(self.state, self.role, bad.reason, bad.count, f"{self.current_shard}: {bad.detail}")
        self.cursor[3] += bad.count
        if self._unit_size is not None:
            self._check_rate(self._unit_size)

    def _count_failed_shard(self, failure: ShardFailed) -> None:
        """The rest of this shard is lost for this epoch; many lost shards mean the store is unusable."""
        failed = self.state.bad.get(failure.reason, 0) + 1
        self.state.bad[failure.reason] = failed
        opened, rate = self.state.opened_shards, self.source.fetch.max_failed_rate
        log.warning("data: shard failed, the rest of it is skipped this epoch (data set %r, role %d): %s; "
                    "%d of %d shards opened by this role failed", self.source.name, self.role, failure.detail,
                    failed, opened)
        if failed > 1 and failed > rate * opened:
            raise BadDataError(f"{failed} of {opened} shards opened by role {self.role} could not be read (data set "
                               f"{self.source.name!r}; last: {failure.detail}), above data.max_failed_shard_rate="
                               f"{rate}; check the store, the network and the credentials in the environment")

    def _check_rate(self, total: int) -> None:
        count = self.cursor[3]
        if count > self.max_bad_rate * max(total, 1):
            raise BadDataError(f"shard {self.current_shard}: {count} of {total} samples unreadable (data set "
                               f"{self.source.name!r}; counts so far {self.state.bad}), above "
                               f"data.max_bad_sample_rate={self.max_bad_rate}")

    def _finish_unit(self) -> None:
        if self._unit_size is not None:
            self._check_rate(self._unit_size)
        epoch, unit_index = self.cursor[:2]
        self.cursor[:] = [epoch, unit_index + 1, 0, 0, 0]
        self._open_key = None


LOG_FIRST, LOG_EVERY = 5, 100  # bad samples logged per reason and role: the first few, then every 100th


def count_bad(state: RoleState, role: int, reason: str, count: int, where: str) -> None:
    """Count bad samples under `reason`; log them (shard and key) at a rate that cannot flood the log."""
    before = state.bad.get(reason, 0)
    state.bad[reason] = after = before + count
    if before < LOG_FIRST or after // LOG_EVERY > before // LOG_EVERY:
        later = f"; from now on every {LOG_EVERY}th is logged" if before < LOG_FIRST <= after else ""
        log.warning("data: skipped a bad sample (%s) %s; role %d has skipped %s%s", reason, where, role,
                    dict(sorted(state.bad.items())), later)


REQUIRED_MEMBERS = (("left",), ("right",), ("disp", "depth"))


def decode_checked(members: dict[str, bytes], key: str) -> Sample:
    """decode_sample, with every failure turned into an UnreadableSample that names its reason."""
    prefixes = {name.split(".", 1)[0] for name in members}
    for alternatives in REQUIRED_MEMBERS:
        if not prefixes.intersection(alternatives):
            raise UnreadableSample("missing_member", f"{key}: no {'/'.join(alternatives)} member (has "
                                   f"{sorted(members)})")
    try:
        sample = decode_sample(members, key)
    except (CodecError, ValueError) as exc:  # JSON and shape errors included: a property of this sample only
        raise UnreadableSample("undecodable", f"{key}: {exc}") from None
    if not sample["valid"].any():
        raise UnreadableSample("invalid_disparity", f"{key}: no valid disparity pixel (NaN, inf or <= 0)")
    return sample


class RoleStream:
    """The samples of one role, mixed by weight, each paired with the draw index that seeds its augmentation."""

    def __init__(self, sources: list[DatasetSource], role: int, num_roles: int, seed: int, max_bad_rate: float,
                 state: RoleState, transform: Transform | None):
        self.sources, self.role, self.seed, self.state, self.transform = sources, role, seed, state, transform
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.cumulative = np.cumsum(weights / weights.sum())
        self.cursors = [DatasetCursor(s, role, num_roles, seed, max_bad_rate, state) for s in sources]

    def next(self) -> Sample:
        draw = self.state.draws
        choice = int(np.searchsorted(self.cumulative, draw_generator(self.seed, self.role, draw, CHOOSE_DATASET)
                                     .random(), side="right"))
        cursor = self.cursors[min(choice, len(self.cursors) - 1)]
        attempt = 0
        while True:
            sample = cursor.next()
            key = sample["key"]
            if self.transform is not None:
                rng = np.random.default_rng([self.seed, self.role, draw, AUGMENT, attempt])
                sample = self.transform(sample, rng)
                attempt += 1
                if sample is None:
                    count_bad(self.state, self.role, "no_valid_crop", 1,
                              f"{cursor.current_shard}: {key}: no crop with a valid pixel below max_disp")
                    if attempt >= MAX_CROP_FAILURES:
                        raise BadDataError(f"data set {cursor.source.name!r}: {attempt} samples in a row without "
                                           "a valid pixel in any crop (is all disparity >= model.max_disp?)")
                    continue
            self.state.draws = draw + 1
            sample["dataset"], sample["key"] = cursor.source.name, key
            return sample
