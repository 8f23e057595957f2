"""Samples out of WebDataset tar shards: random access to local tars, streams of remote objects and `pipe:`s.

A sample is the group of consecutive members `<key>.<ext>` sharing a key (the name up to the first dot of the
basename). Local tars are indexed once (member headers only: one small read per member), then any sample is read
by offset, so a shard can be visited in any order and a resumed run seeks straight to its position. Damaged data
is reported per sample as `UnreadableSample(reason)` instead of stopping the stream; the caller counts and skips it.
"""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO

from stereo.data.remote import FetchError, RangeReader, RetryPolicy, ShardCache, CacheWriter, redact
from stereo.data.shardlist import PIPE_PREFIX


class UnreadableSample(Exception):
    """One unreadable sample; `reason` is a short stable word used as the counter's name."""

    def __init__(self, reason: str, detail: str = "", count: int = 1):
        self.reason, self.detail, self.count = reason, detail, count  # count: samples lost at once
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ShardFailed(UnreadableSample):
    """A streamed shard that could not be fetched to its end within the retry budget (counted per shard)."""

    def __init__(self, detail: str):
        super().__init__("failed_shards", detail)


@dataclass(frozen=True)
class IndexedSample:
    key: str
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size)


@dataclass(frozen=True)
class TarIndex:
    path: str
    samples: list[IndexedSample]
    size: int  # file size, to spot members whose data runs past the end


def split_name(name: str) -> tuple[str, str]:
    """`dir/000123.disp.fsd.png` -> (`dir/000123`, `disp.fsd.png`)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


@lru_cache(maxsize=8)
def index_tar(path: str) -> TarIndex:
    """Read the member headers of a local tar. A truncated tar yields the samples whose headers survived."""
    samples: list[IndexedSample] = []
    current_key, current = None, {}
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(0)
        try:
            with tarfile.open(fileobj=handle, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = split_name(info.name)
                    if key != current_key and current:
                        samples.append(IndexedSample(current_key, current))
                        current = {}
                    current_key = key
                    current[ext] = (info.offset_data, info.size)
        except tarfile.TarError as exc:
            if not samples and not current:
                raise UnreadableSample("unreadable_shard", f"{path}: {exc}") from None
    if current:
        samples.append(IndexedSample(current_key, current))
    return TarIndex(path, samples, size)


def read_indexed(handle: BinaryIO, index: TarIndex, entry: IndexedSample) -> dict[str, bytes]:
    members = {}
    for ext, (offset, size) in entry.members.items():
        if offset + size > index.size:
            raise UnreadableSample("truncated", f"{index.path}: {entry.key}.{ext} runs past the end of the file")
        handle.seek(offset)
        members[ext] = handle.read(size)
    return members


def _blocks(size: int) -> int:
    return (size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE


def iter_tar(handle: BinaryIO, base: int = 0) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """Samples of a tar stream in order, each with the byte offset just past it (`base` = the stream's offset in
    the file), where a reader can start again; raises tarfile.TarError on damaged data."""
    current_key, current, end = None, {}, base
    with tarfile.open(fileobj=handle, mode="r|", bufsize=1 << 20) as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = split_name(info.name)
            if key != current_key and current:
                yield current_key, current, end
                current = {}
            current_key = key
            data = tar.extractfile(info).read()
            if len(data) != info.size:
                raise tarfile.ReadError(f"{info.name}: {len(data)} of {info.size} bytes")
            current[ext] = data
            end = base + info.offset_data + _blocks(info.size)
    if current:
        yield current_key, current, end


@dataclass(frozen=True)
class FetchOptions:
    """How streamed shards (remote objects and `pipe:` commands) are fetched."""

    retry: RetryPolicy = RetryPolicy()
    cache: ShardCache | None = None
    max_failed_rate: float = 0.05  # of the shards a role opened; above it (and more than one) training stops


Streamed = Iterator[tuple[str, dict[str, bytes], int] | UnreadableSample]


def iter_streamed(url: str, start: int, options: FetchOptions, on_retry: Callable[[], None] | None = None,
                  ) -> Streamed:
    """Samples of a remote or `pipe:` shard in stream order (remote objects from byte `start`, pipes from their
    start). Damaged data ends with one UnreadableSample; a shard that cannot be fetched within the retry budget
    ends with ShardFailed. `on_retry()` is called on each reconnect or re-run."""
    if url.startswith(PIPE_PREFIX):
        yield from _iter_pipe(url, options.retry, on_retry)
    else:
        yield from _iter_remote(url, start, options, on_retry)


def _iter_remote(url: str, start: int, options: FetchOptions, on_retry: Callable[[], None] | None) -> Streamed:
    cache = options.cache
    handle = cache.open(url) if cache is not None else None
    writer = None
    try:
        if handle is not None:
            handle.seek(start)
        else:
            handle = RangeReader(url, start, options.retry, on_retry)
            if cache is not None:
                writer = cache.writer(url, handle.size, start)
    except FetchError as exc:
        yield ShardFailed(str(exc))
        return
    source = _Tee(handle, writer, start) if writer is not None else handle
    complete = False
    try:
        yield from iter_tar(source, start)
        source.read()  # the tar's padding: the cached copy must be the whole object
        complete = True
    except tarfile.ReadError as exc:
        if not (start > 0 and str(exc) == "empty file"):  # resumed right at the end-of-archive blocks: done
            yield UnreadableSample("truncated", f"{redact(url)}: {exc}")
    except tarfile.TarError as exc:
        yield UnreadableSample("truncated", f"{redact(url)}: {exc}")
    except FetchError as exc:
        yield ShardFailed(str(exc))
    finally:
        if writer is not None:
            source.close()
            writer.close(complete)
        handle.close()


class _Tee:
    """Reads from byte `start` what the cache writer's partial copy holds already from that copy, and the rest from
    the remote reader, through to the writer."""

    def __init__(self, reader: RangeReader, writer: CacheWriter, start: int):
        self.reader, self.writer = reader, writer
        self.local: BinaryIO | None = None
        self.local_left = writer.written - start
        if self.local_left > 0:
            self.local = open(writer.part, "rb")
            self.local.seek(start)
            reader.skip_to(writer.written)

    def read(self, size: int = -1) -> bytes:
        if self.local is not None:  # a short read: the tar stream asks again for the rest
            data = self.local.read(self.local_left if size < 0 else min(size, self.local_left))
            self.local_left -= len(data)
            if self.local_left <= 0 or not data:
                self.local.close()
                self.local = None
            if size >= 0 or self.local is not None:
                return data
            return data + self.read()
        data = self.reader.read(size)
        self.writer.write(data)
        return data

    def close(self) -> None:
        if self.local is not None:
            self.local.close()


class _PipeFailed(Exception):
    pass


def _iter_pipe(url: str, retry: RetryPolicy, on_retry: Callable[[], None] | None) -> Streamed:
    """A failed command (non-zero exit) is run again and the samples already delivered are skipped; a damaged
    tar from a command that succeeded is the data's fault and is not retried."""
    delivered, failures = 0, 0
    while True:
        seen = 0
        try:
            with closing(_run_pipe(url)) as items:  # closed early too: the command is stopped at once
                for item in items:
                    seen += 1
                    if seen <= delivered:
                        continue
                    delivered, failures = delivered + 1, 0
                    yield item
            return
        except _PipeFailed as exc:
            failures += 1
            if failures > retry.retries:
                yield ShardFailed(f"{url}: {exc} (gave up after {retry.retries} retries)")
                return
            if on_retry is not None:
                on_retry()
            retry.wait(failures)
        except UnreadableSample as bad:
            yield bad
            return


def _run_pipe(url: str) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """One run of a `pipe:` command; raises _PipeFailed (the command failed) or UnreadableSample (bad tar)."""
    # stderr goes to a file: object-store CLIs print progress there, which would fill a pipe and stall the stream
    errors = tempfile.TemporaryFile()
    process = subprocess.Popen(url[len(PIPE_PREFIX):], shell=True, stdout=subprocess.PIPE, stderr=errors)
    failure, read_to_end = None, False
    try:
        try:
            yield from iter_tar(process.stdout)
        except tarfile.TarError as exc:
            failure = str(exc)
        read_to_end = failure is None
    finally:
        process.stdout.close()
        if not read_to_end:  # the reader stopped early or the stream broke: stop the command
            process.kill()
        returncode = process.wait()
        errors.seek(0)
        stderr = errors.read().decode(errors="replace").strip()
        errors.close()
    said = f" (command said: {stderr[-300:]})" if stderr else ""
    if returncode > 0:  # the command failed on its own (< 0: our kill); a short tar can look clean
        raise _PipeFailed(f"exit status {returncode}{said}")
    if failure is not None:
        raise UnreadableSample("truncated", f"{url}: {failure}{said}")
