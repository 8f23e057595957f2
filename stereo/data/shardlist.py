"""Resolve a data set's `shards:` string into the list of shards to read.

Accepted forms: a directory holding `manifest.json` (written by `stereo.data.shards.write_shards`), a text file
listing one shard per line, a brace pattern (`shards/fsd/{000000..000999}.tar`), a single tar path, the same on
object storage (`s3://bucket/fsd` with its manifest.json, `s3://bucket/fsd/{000000..000999}.tar`,
`https://host/fsd/`), and `pipe:` commands (`pipe:aws s3 cp s3://bucket/fsd/{000000..000099}.tar -`), which are
brace-expanded too. Remote sources are checked here: the manifest is read, an S3 pattern's objects are listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from stereo.data.remote import FetchError, is_remote, list_prefix, missing_objects, read_bytes

PIPE_PREFIX = "pipe:"


class ShardListError(ValueError):
    """A shard source that cannot be resolved; the message names it and says what was expected."""


@dataclass(frozen=True)
class Shard:
    url: str  # a local path or a `pipe:` command whose stdout is the tar
    num_samples: int | None = None  # from the manifest, when there is one

    @property
    def is_pipe(self) -> bool:
        return self.url.startswith(PIPE_PREFIX)

    @property
    def is_streamed(self) -> bool:
        """Read in stream order (a remote object or a pipe), not by random access like a local tar."""
        return self.is_pipe or is_remote(self.url)


def resolve_shards(source: str) -> list[Shard]:
    source = source.strip()
    if not source:
        raise ShardListError("empty shard source: expected a directory, a list file, a pattern or a pipe: command")
    if source.startswith(PIPE_PREFIX):
        return [Shard(url) for url in braceexpand(source)]
    if is_remote(source):
        try:
            return _remote(source)
        except FetchError as exc:
            raise ShardListError(str(exc) if str(exc).startswith(f"{source}: ") else f"{source}: {exc}") from None
    path = Path(source)
    if path.is_dir():
        return _from_manifest(path)
    if path.is_file() and path.suffix in (".txt", ".list"):
        return _from_list_file(path)
    shards = [Shard(url) for url in braceexpand(source)]
    missing = [s.url for s in shards if not Path(s.url).is_file()]
    if missing:
        raise ShardListError(f"{source}: {len(missing)} of {len(shards)} shard files do not exist "
                             f"(first: {missing[0]}); "
                             "expected a directory with manifest.json, a list file, a tar path or brace pattern, "
                             "or a pipe: command")
    return shards


def _remote(source: str) -> list[Shard]:
    if "@" in source.split("/")[2]:
        raise ShardListError(f"{source.split('@')[-1]}: credentials in a shard URL would be written into the run's "
                             "config; give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)")
    if "{" not in source and not source.endswith(".tar"):  # a shard folder: its manifest lists the shards
        base = source.rstrip("/")
        try:
            text = read_bytes(f"{base}/manifest.json")
        except FetchError as exc:
            if not exc.permanent or "no such object" not in str(exc) or not base.startswith("s3://"):
                raise
            raise ShardListError(f"{source}: {_folder_problem(base)}; expected a shard folder with manifest.json "
                                 "(written by `make shards` or `make shards-upload`), or a brace pattern of tar "
                                 "objects") from None
        return _parse_manifest(f"{base}/manifest.json", text, base)
    shards = [Shard(url) for url in braceexpand(source)]
    if source.startswith("s3://"):
        missing = missing_objects([s.url for s in shards])
        if missing:
            raise ShardListError(f"{source}: {len(missing)} of {len(shards)} shard objects do not exist (first: "
                                 f"{missing[0]})")
    return shards


def _folder_problem(base: str) -> str:
    """What is missing at an s3:// shard folder whose manifest.json does not exist."""
    found = list_prefix(f"{base}/", limit=1)
    if not found:
        return f"nothing under {base}/ (no such prefix)"
    return f"no manifest.json under {base}/ (it holds e.g. {found[0]})"


def _parse_manifest(where: str, text: bytes | str, base: str) -> list[Shard]:
    try:
        manifest = json.loads(text)
        entries = manifest["shards"]
        shards = [Shard(f"{base}/{entry['name']}", int(entry["num_samples"])) for entry in entries]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ShardListError(f"{where}: not a valid manifest ({exc!r}); expected "
                             '{"shards": [{"name", "num_samples", ...}, ...]}') from None
    if not shards:
        raise ShardListError(f"{where}: lists no shards")
    return shards


def _from_manifest(directory: Path) -> list[Shard]:
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise ShardListError(f"{directory}: no manifest.json; expected a shard directory written by `python -m stereo "
                             "shards` or `demo-data` (or give a brace pattern of tar files)")
    return _parse_manifest(str(manifest_path), manifest_path.read_text(), str(directory))


def _from_list_file(path: Path) -> list[Shard]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    urls = [line for line in lines if line and not line.startswith("#")]
    if not urls:
        raise ShardListError(f"{path}: the list file names no shards")
    return [Shard(url if url.startswith(PIPE_PREFIX) or is_remote(url) or Path(url).is_absolute()
                  else str(path.parent / url)) for url in urls]
