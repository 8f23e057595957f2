"""Write WebDataset tar shards of about a fixed size, in parallel, resumably, with a manifest.

The plan (which items go into which shard) is a pure function of the items' sizes and the shard size, so a re-run
after an interruption rebuilds the same plan, keeps every shard the manifest lists whose size and sha256 still match,
and writes the rest. A shard is written as `NNNNNN.tar.tmp` and renamed when complete; the manifest lists only
renamed shards, so readers never see a half-written one.

An `s3://bucket/prefix` output goes through a local staging folder: each worker uploads its finished shard (S3
shows an object whole or not at all) and deletes the local copy, then the manifest is uploaded, listing only
uploaded shards. A re-run keeps the shards the remote manifest lists whose objects still have the listed size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stereo.data.remote import FetchError, object_size, read_bytes, upload_file
from stereo.data.sample import BadSample, RawSample

__all__ = ["BadSample", "ShardWriteError", "parse_size", "plan_shards", "write_shards", "read_manifest"]

MANIFEST = "manifest.json"
Encode = Callable[[Any], tuple[str, dict[str, bytes]]]


class ShardWriteError(RuntimeError):
    """The output directory cannot be (re)used or a worker died; the message says what to do."""


def parse_size(text: str | float | int) -> int:
    """'1GB', '500MB', '64KiB', '1e9', 1000000 -> bytes (decimal units; KiB/MiB/GiB binary)."""
    if isinstance(text, (int, float)):
        return int(text)
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in units:
        raise ValueError(f"shard size {text!r}: expected a number with an optional unit (e.g. 1GB, 500MB, 64MiB)")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def plan_shards(sizes: Sequence[int], shard_bytes: int) -> list[range]:
    """Consecutive item ranges, each closed once its items reach `shard_bytes` (every shard holds >= 1 item)."""
    plan, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        total += size
        if total >= shard_bytes:
            plan.append(range(start, index + 1))
            start, total = index + 1, 0
    if start < len(sizes):
        plan.append(range(start, len(sizes)))
    return plan


def raw_size(item: RawSample) -> int:
    """Bytes a raw sample occupies on disk (its shard members are those bytes plus small masks and metadata)."""
    return sum(os.path.getsize(path) for path in item.files() if os.path.exists(path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed mtime: re-runs write identical bytes
    tar.addfile(info, _Bytes(data))


class _Bytes:
    """The minimal file object tarfile.addfile reads from (avoids copying into a BytesIO)."""

    def __init__(self, data: bytes):
        self._view, self._pos = memoryview(data), 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else self._pos + size
        chunk = self._view[self._pos : end].tobytes()
        self._pos += len(chunk)
        return chunk


@dataclass(frozen=True)
class _ShardJob:
    out_dir: str
    name: str
    items: list[Any]
    encode: Encode
    upload_to: str | None = None  # s3://bucket/prefix: upload the finished shard there, then drop the local copy


def _write_shard(job: _ShardJob) -> dict[str, Any]:
    """Encode the job's items into `<name>.tmp`, rename to `<name>`; returns the manifest entry + bad samples."""
    final = Path(job.out_dir) / job.name
    tmp = final.with_name(final.name + ".tmp")
    bad, count = [], 0
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for item in job.items:
            try:
                key, members = job.encode(item)
            except BadSample as exc:
                bad.append({"path": exc.path, "reason": exc.reason, "shard": job.name})
                continue
            for ext, data in members.items():
                _add_member(tar, f"{key}.{ext}", data)
            count += 1
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    entry = {"name": job.name, "num_samples": count, "bytes": final.stat().st_size, "sha256": _sha256(final)}
    if job.upload_to:
        upload_file(final, f"{job.upload_to}/{job.name}", metadata={"sha256": entry["sha256"]})  # shards-upload
        final.unlink()
    return {"entry": entry, "bad_samples": bad}


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    if str(out_dir).startswith("s3://"):
        url = f"{str(out_dir).rstrip('/')}/{MANIFEST}"
        if object_size(url) is None:
            return None
        text, path = read_bytes(url).decode(), url
    else:
        path = Path(out_dir) / MANIFEST
        if not path.is_file():
            return None
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ShardWriteError(f"{path}: not valid JSON ({exc}); remove it to rewrite the shards") from exc


class _Output:
    """Where the shards go: a local folder, or an s3:// prefix through a local staging folder."""

    def __init__(self, out_dir: str | Path):
        self.remote = str(out_dir).rstrip("/") if str(out_dir).startswith("s3://") else None
        self.dir = Path(tempfile.mkdtemp(prefix="shards-staging-")) if self.remote else Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = self.remote or str(self.dir)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, self.dir / MANIFEST)
        if self.remote:
            upload_file(self.dir / MANIFEST, f"{self.remote}/{MANIFEST}")

    def intact(self, entry: dict[str, Any]) -> bool:
        if self.remote:
            return object_size(f"{self.remote}/{entry['name']}") == entry["bytes"]
        path = self.dir / entry["name"]
        return path.is_file() and path.stat().st_size == entry["bytes"] and _sha256(path) == entry["sha256"]

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.dir, ignore_errors=True)


def _finished_shards(out: _Output, old: dict[str, Any] | None, plan_id: str) -> dict[str, dict[str, Any]]:
    """Shards of an earlier run of the same plan that are still intact: name -> result."""
    if old is None:
        return {}
    if old.get("plan") != plan_id:
        raise ShardWriteError(f"{out.name} holds shards of a different plan (other data, options or shard size); "
                              "remove it or choose another output directory")
    kept = {}
    for entry in old.get("shards", []):
        if out.intact(entry):
            bad = [b for b in old.get("bad_samples", []) if b.get("shard") == entry["name"]]
            kept[entry["name"]] = {"entry": entry, "bad_samples": bad}
    return kept


def write_shards(
    items: Sequence[Any],
    encode: Encode,
    out_dir: str | Path,
    dataset: str,
    shard_bytes: int | float | str = 1e9,
    workers: int | None = None,
    size_of: Callable[[Any], int] | None = None,
) -> dict[str, Any]:
    """Write `items` as tar shards `OUT/NNNNNN.tar` plus `OUT/manifest.json`; returns the final manifest.

    `encode(item) -> (key, {ext: bytes})` must be picklable (a module-level function) when workers > 0; it raises
    `BadSample(path, reason)` for an item to skip. `size_of(item)` (default: the raw sample's file sizes) drives the
    plan. workers=0 encodes in this process; None uses every core. OUT may be `s3://bucket/prefix`.
    """
    output = _Output(out_dir)
    try:
        return _write_all(items, encode, output, dataset, shard_bytes, workers, size_of)
    except FetchError as exc:
        raise ShardWriteError(f"{output.name}: {exc}; finished shards are in the manifest: run the same command "
                              "again to write the rest") from None
    finally:
        output.close()


def _write_all(items: Sequence[Any], encode: Encode, output: _Output, dataset: str, shard_bytes: int | float | str,
               workers: int | None, size_of: Callable[[Any], int] | None) -> dict[str, Any]:
    out = output.dir
    items = list(items)
    if not items:
        raise ShardWriteError(f"{dataset}: nothing to write to {output.name}")
    size_of = size_of or raw_size
    shard_bytes = parse_size(shard_bytes)
    plan = plan_shards([size_of(item) for item in items], shard_bytes)
    names = [f"{index:06d}.tar" for index in range(len(plan))]
    plan_id = hashlib.sha256(json.dumps([dataset, shard_bytes, [list(r)[-1] for r in plan], len(items)]).encode())
    plan_id = plan_id.hexdigest()[:16]
    for stale in out.glob("*.tar.tmp"):  # left by an interrupted run; never listed
        stale.unlink()

    results = _finished_shards(output, read_manifest(output.remote or out), plan_id)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def manifest() -> dict[str, Any]:
        done = [results[name] for name in names if name in results]
        return {
            "dataset": dataset,
            "num_samples": sum(r["entry"]["num_samples"] for r in done),
            "shards": [r["entry"] for r in done],
            "bad_samples": [b for r in done for b in r["bad_samples"]],
            "created": created,
            "complete": len(done) == len(names),
            "planned_shards": len(names),
            "num_items": len(items),
            "shard_bytes": shard_bytes,
            "plan": plan_id,
        }

    def finish(result: dict[str, Any]) -> None:
        results[result["entry"]["name"]] = result
        for bad in result["bad_samples"]:
            tqdm.write(f"bad sample {bad['path']}: {bad['reason']}", file=sys.stderr)
        output.write_manifest(manifest())
        progress.update(len(plan[names.index(result["entry"]["name"])]))

    todo = [_ShardJob(str(out), name, [items[i] for i in plan[index]], encode, output.remote)
            for index, name in enumerate(names) if name not in results]
    workers = min(os.cpu_count() or 1, len(todo)) if workers is None else workers
    skipped = sum(len(plan[names.index(name)]) for name in results)
    with tqdm(total=len(items), initial=skipped, unit="sample", desc=f"shards {dataset}", file=sys.stderr) as progress:
        output.write_manifest(manifest())
        if workers <= 0 or not todo:
            for job in todo:
                finish(_write_shard(job))
        else:
            _run_pool(todo, workers, finish, output.name)
    final = manifest()
    output.write_manifest(final)
    return final


def _run_pool(todo: list[_ShardJob], workers: int, finish: Callable[[dict[str, Any]], None], out: str) -> None:
    """At most `workers` shards in flight (bounded memory: jobs carry their items, not their bytes)."""
    pending = iter(todo)
    # A dead worker breaks the pool: it surfaces in a future's result or in the next submit, whichever comes first
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            running = {pool.submit(_write_shard, job) for job in islice(pending, workers)}
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    finish(future.result())
                    running |= {pool.submit(_write_shard, job) for job in [next(pending, None)] if job is not None}
    except BrokenProcessPool as exc:
        raise ShardWriteError(f"a shard worker died while writing into {out}; finished shards are in the manifest: "
                              "run the same command again to write the rest") from exc
