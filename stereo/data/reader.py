"""Samples out of WebDataset tar shards: random access to local tars, sequential reading of `pipe:` streams.

A sample is the group of consecutive members `<key>.<ext>` sharing a key (the name up to the first dot of the
basename). Local tars are indexed once (member headers only: one small read per member), then any sample is read
by offset, so a shard can be visited in any order and a resumed run seeks straight to its position. Damaged data
is reported per sample as `UnreadableSample(reason)` instead of stopping the stream; the caller counts and skips it.
"""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO

from stereo.data.shardlist import PIPE_PREFIX


class UnreadableSample(Exception):
    """One unreadable sample; `reason` is a short stable word used as the counter's name."""

    def __init__(self, reason: str, detail: str = "", count: int = 1):
        self.reason, self.detail, self.count = reason, detail, count  # count: samples lost at once
        super().__init__(f"{reason}: {detail}" if detail else reason)


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


def iter_pipe(url: str) -> Iterator[tuple[str, dict[str, bytes]] | UnreadableSample]:
    """Samples of a `pipe:` command's tar stream in order; a damaged tail or a failed command gives one
    UnreadableSample at the end."""
    # stderr goes to a file: object-store CLIs print progress there, which would fill a pipe and stall the stream
    errors = tempfile.TemporaryFile()
    process = subprocess.Popen(url[len(PIPE_PREFIX):], shell=True, stdout=subprocess.PIPE, stderr=errors)
    failure, read_to_end = None, False
    try:
        current_key, current = None, {}
        try:
            with tarfile.open(fileobj=process.stdout, mode="r|") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = split_name(info.name)
                    if key != current_key and current:
                        yield current_key, current
                        current = {}
                    current_key = key
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"{info.name}: {len(data)} of {info.size} bytes")
                    current[ext] = data
        except tarfile.TarError as exc:
            failure = str(exc)
        if current and failure is None:
            yield current_key, current
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
        yield UnreadableSample("pipe_failed", f"{url}: exit status {returncode}{said}")
    elif failure is not None:
        yield UnreadableSample("truncated", f"{url}: {failure}{said}")
