"""Shards on object storage: `s3://bucket/key` through boto3 and `http(s)://` through requests, with retries.

boto3 is AWS's own SDK: it reads the endpoint (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`), the region
(`AWS_REGION`) and the credentials (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, instance or pod
roles) from the environment and ~/.aws exactly as the `aws` CLI does, speaks to any S3-compatible store (MinIO,
Ceph, moto), and does HTTP range requests. Nothing of that configuration passes through our config, so nothing of it
can reach the run directory, the config dump or wandb. The test server (moto) is built on boto3 anyway.

`RangeReader` is a read-only file object over one remote object. It reads the body as it arrives (one socket read
at a time), so a connection that drops (reset, closed early) or stalls past the read timeout in the middle loses
nothing it delivered: it is re-opened with a range request at the next byte, after a backoff that doubles on each
failure in a row. Only failures without progress count against the budget: any byte received resets it, so a link
that keeps breaking still gets through the object, while one that delivers nothing gives up after `retries`.
Errors that a retry cannot fix (no such bucket or key, access denied, no credentials) fail at once. Each reconnect
is logged (the first few, then at most one line per interval) and reported to the caller for its counters.
`ShardCache` keeps whole objects on node-local disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
REMOTE_SCHEMES = ("s3://", "http://", "https://")
MAX_BACKOFF_S = 60.0
READ_SIZE = 1 << 20  # the most one socket read hands over


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_SCHEMES)


class FetchError(OSError):
    """A remote object that could not be read: `permanent` when retrying cannot help (missing, forbidden)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # failures in a row (without progress) before giving up
    backoff_s: float = 1.0  # the first wait; doubled after each further failure, at most MAX_BACKOFF_S
    timeout_s: float = 60.0  # a connection that delivers no byte for this long is a stalled one: re-opened

    def wait(self, failures: int) -> None:
        time.sleep(min(self.backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S))


# --- clients --------------------------------------------------------------------------------------------------

_S3_CLIENTS: dict[tuple[int, float], Any] = {}  # per process: clients must not cross a fork (DataLoader workers)


def s3_client(timeout_s: float = 60.0) -> Any:
    key = (os.getpid(), float(timeout_s))
    if key not in _S3_CLIENTS:
        import boto3
        from botocore.config import Config

        # botocore retries failed requests itself; the streamed body is retried by RangeReader
        config = Config(connect_timeout=min(10.0, timeout_s), read_timeout=timeout_s,
                        retries={"mode": "standard", "max_attempts": 3},
                        s3={"addressing_style": os.environ.get("STEREO_S3_ADDRESSING", "auto")})
        for stale in [k for k in _S3_CLIENTS if k[0] != key[0]]:  # a forked child's copies of the parent's
            del _S3_CLIENTS[stale]
        _S3_CLIENTS[key] = boto3.session.Session().client("s3", config=config)
    return _S3_CLIENTS[key]


def split_s3(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b.tar` -> (`bucket`, `a/b.tar`)."""
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise FetchError(f"{url}: expected s3://bucket/key", permanent=True)
    return bucket, key


def _transient_status(status: int) -> bool:
    return status >= 500 or status in (408, 429)


NOT_FOUND = {"NoSuchBucket": "the bucket does not exist", "NoSuchKey": "no such object",
             "404": "no such object", "AccessDenied": "access denied (check the credentials in the environment)",
             "403": "access denied (check the credentials in the environment)"}


def _classify(url: str, exc: Exception) -> FetchError:
    """Any client exception -> FetchError, permanent unless a retry could succeed."""
    import botocore.exceptions as boto
    import requests

    if isinstance(exc, FetchError):
        return exc
    if isinstance(exc, boto.ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = exc.response.get("Error", {}).get("Code", "?")
        meaning = f": {NOT_FOUND[code]}" if code in NOT_FOUND else ""
        return FetchError(f"{url}: {code} (HTTP {status}){meaning}", permanent=not _transient_status(status))
    if isinstance(exc, (boto.NoCredentialsError, boto.PartialCredentialsError, boto.ParamValidationError)):
        return FetchError(f"{url}: {exc} (the S3 client reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                          "AWS_ENDPOINT_URL, AWS_REGION or AWS_PROFILE from the environment)", permanent=True)
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        meaning = f": {NOT_FOUND[str(status)]}" if str(status) in NOT_FOUND else ""
        return FetchError(f"{url}: HTTP {status}{meaning}", permanent=not _transient_status(status))
    return FetchError(f"{url}: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    """A network error in words, without the endpoint's address (it is configured in the environment only and
    must not reach a log that may be shared)."""
    import urllib3.exceptions

    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (TimeoutError, urllib3.exceptions.TimeoutError)) or "timed out" in text.lower():
        text = f"stalled: no byte within the read timeout ({text})"
    text = re.sub(r"\w+://[^\s'\"]+", "<endpoint>", text)
    return re.sub(r"host='[^']*', port=\d+", "<endpoint>", text)


def _open_body(url: str, start: int, timeout_s: float) -> tuple[Any, int]:
    """A raw streaming body (urllib3's, read one socket read at a time) from byte `start`, and the object's size."""
    if url.startswith("s3://"):
        import botocore.exceptions as boto

        bucket, key = split_s3(url)
        try:
            response = s3_client(timeout_s).get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-")
        except boto.ClientError as exc:
            if start and exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416:
                return _EmptyBody(), start  # asked from the very end: nothing left
            raise
        # botocore's StreamingBody reads until its whole request is filled and drops what it had when the
        # connection breaks; the urllib3 response under it hands over each socket read (read1)
        return response["Body"]._raw_stream, start + int(response["ContentLength"])
    import requests

    response = requests.get(url, headers={"Range": f"bytes={start}-"}, stream=True,
                            timeout=(min(10.0, timeout_s), timeout_s))
    if response.status_code == 416:  # asked from the very end: nothing left
        response.close()
        return _EmptyBody(), start
    response.raise_for_status()
    total = int(response.headers.get("Content-Length", -1))
    if start and response.status_code != 206:  # the server ignored the range: skip what was read already
        response.raw.read(start)
        return response.raw, total
    return response.raw, start + total if total >= 0 else -1


class _EmptyBody:
    def read1(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


def _network_errors() -> tuple[type[BaseException], ...]:
    import botocore.exceptions as boto
    import requests
    import urllib3.exceptions

    return (boto.BotoCoreError, boto.ClientError, requests.RequestException, urllib3.exceptions.HTTPError, OSError)


class RangeReader:
    """Sequential reads of one remote object from byte `start`, resuming after dropped or stalled connections.

    `on_retry()` is called on each reconnect (the data stream counts them for the metrics)."""

    def __init__(self, url: str, start: int = 0, policy: RetryPolicy = RetryPolicy(),
                 on_retry: Callable[[], None] | None = None):
        self.url, self.position, self.policy, self.on_retry = url, start, policy, on_retry
        self.size: int | None = None
        self.retried = 0  # reconnections so far (for the log and the tests)
        self._body: Any = None
        self._failures = 0  # failures since the last byte received
        self._given_up: FetchError | None = None
        self._errors = _network_errors()
        self._connect()

    def _connect(self) -> None:
        while True:
            try:
                self._body, size = _open_body(self.url, self.position, self.policy.timeout_s)
                self.size = size if size >= 0 else None
                return
            except self._errors as exc:
                self._failed(_classify(self.url, exc))

    def _failed(self, error: FetchError) -> None:
        self._close_body()
        self._failures += 1
        if error.permanent or self._failures > self.policy.retries:
            tries = "" if error.permanent else f" (gave up after {self.policy.retries} retries without progress)"
            where = f" at byte {self.position}" if self.position or not error.permanent else ""
            raise FetchError(f"{error}{where}{tries}", error.permanent) from None
        self.retried += 1
        RECONNECTS.note(self.url, self.position, str(error).removeprefix(f"{self.url}: "), self._failures)
        if self.on_retry is not None:
            self.on_retry()
        self.policy.wait(self._failures)

    def read(self, size: int = -1) -> bytes:
        if self._given_up is not None:
            raise self._given_up
        chunks, wanted = [], size
        try:
            while wanted != 0:
                if self._body is None:
                    self._connect()
                try:
                    chunk = self._body.read1(min(wanted, READ_SIZE) if wanted > 0 else READ_SIZE)
                except self._errors as exc:
                    self._failed(_classify(self.url, exc))
                    continue
                if not chunk:
                    if self.size is not None and self.position < self.size:  # closed early without an error
                        self._failed(FetchError(f"{self.url}: connection closed at byte {self.position} of "
                                                f"{self.size}"))
                        continue
                    break
                chunks.append(chunk)  # kept whatever happens next: a reconnect resumes after it
                self.position += len(chunk)
                self._failures = 0
                if wanted > 0:
                    wanted -= len(chunk)
        except FetchError as exc:
            if not chunks:
                raise
            self._given_up = exc  # hand out what arrived (whole samples in it are kept), fail on the next read
        return b"".join(chunks)

    def skip_to(self, position: int) -> None:
        """Go on from `position` (>= the current one): the bytes between are had elsewhere (a partial copy)."""
        self._close_body()
        self.position = position

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                pass
            self._body = None

    def close(self) -> None:
        self._close_body()

    def __enter__(self) -> "RangeReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


RECONNECT_LOG_FIRST, RECONNECT_LOG_INTERVAL_S = 5, 60.0


class _ReconnectLog:
    """The reconnects of this process: the first few logged each, then at most one line per interval that says how
    many went unlogged meanwhile (a flaky store must not flood the log)."""

    def __init__(self) -> None:
        self.count, self.unlogged, self.logged_at = 0, 0, -float("inf")

    def note(self, url: str, offset: int, cause: str, failures: int) -> None:
        self.count += 1
        now = time.monotonic()
        if self.count > RECONNECT_LOG_FIRST and now - self.logged_at < RECONNECT_LOG_INTERVAL_S:
            self.unlogged += 1
            return
        more = f"; {self.unlogged} more reconnects since the last such line" if self.unlogged else ""
        later = (f"; from now on at most one such line per {RECONNECT_LOG_INTERVAL_S:.0f} s"
                 if self.count == RECONNECT_LOG_FIRST else "")
        log.warning("data: reconnecting to %s at byte %d (failure %d in a row without progress): %s%s%s",
                    redact(url), offset, failures, cause, more, later)
        self.unlogged, self.logged_at = 0, now


RECONNECTS = _ReconnectLog()


def read_bytes(url: str, policy: RetryPolicy = RetryPolicy()) -> bytes:
    with RangeReader(url, 0, policy) as reader:
        return reader.read()


def missing_objects(urls: list[str]) -> list[str]:
    """The S3 URLs among `urls` that do not exist, found by listing their common prefix (1 request per 1000)."""
    by_bucket: dict[str, set[str]] = {}
    for url in urls:
        bucket, key = split_s3(url)
        by_bucket.setdefault(bucket, set()).add(key)
    missing = []
    for bucket, keys in by_bucket.items():
        prefix = os.path.commonprefix(sorted(keys))
        found: set[str] = set()
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                found.update(item["Key"] for item in page.get("Contents", []))
        except _network_errors() as exc:
            raise _classify(f"s3://{bucket}/{prefix}", exc) from None
        missing += [f"s3://{bucket}/{key}" for key in sorted(keys - found)]
    return missing


def list_prefix(url: str, limit: int | None = None) -> list[str]:
    """The object URLs under an s3:// prefix (at most `limit` of them)."""
    bucket, prefix = split_s3(url)
    found: list[str] = []
    try:
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", [])]
            if limit is not None and len(found) >= limit:
                return found[:limit]
    except _network_errors() as exc:
        raise _classify(url, exc) from None
    return found


def upload_file(path: str | Path, url: str, metadata: dict[str, str] | None = None) -> None:
    """A local file to s3://bucket/key (multipart for large files; S3 shows the object whole or not at all)."""
    from boto3.exceptions import S3UploadFailedError

    bucket, key = split_s3(url)
    try:
        s3_client().upload_file(str(path), bucket, key, ExtraArgs={"Metadata": metadata} if metadata else None)
    except _network_errors() as exc:
        raise _classify(url, exc) from None
    except S3UploadFailedError as exc:  # boto3's wrapper of the client error (no such bucket, access denied, ...)
        raise _classify(url, exc.__context__ if isinstance(exc.__context__, Exception) else exc) from None


def object_head(url: str) -> dict[str, Any] | None:
    """{"size", "sha256" (our metadata; "" when absent)} of s3://bucket/key, or None when it does not exist."""
    bucket, key = split_s3(url)
    import botocore.exceptions as boto

    try:
        head = s3_client().head_object(Bucket=bucket, Key=key)
    except boto.ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return None
        raise _classify(url, exc) from None
    except _network_errors() as exc:
        raise _classify(url, exc) from None
    return {"size": int(head["ContentLength"]), "sha256": head.get("Metadata", {}).get("sha256", "")}


def object_size(url: str) -> int | None:
    """Bytes of s3://bucket/key, or None when it does not exist."""
    head = object_head(url)
    return None if head is None else head["size"]


def redact(url: str) -> str:
    """The URL without a `user:password@` part (for messages)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        return url.replace(parts.netloc, parts.hostname + (f":{parts.port}" if parts.port else ""), 1)
    return url


# --- node-local cache -----------------------------------------------------------------------------------------


STALE_PART_S = 3600.0  # a `.part` of another host untouched this long belongs to a writer that is gone


class ShardCache:
    """Whole remote objects kept in `directory`, at most `max_bytes` in all (partial copies included), least
    recently used evicted first.

    Safe with many writers (workers, ranks) at once without coordination on the read path: each writer streams
    into its own `<hash>.<host>.<pid>.part` file and publishes it with an atomic rename (two writers of one shard
    publish the same bytes); a reader keeps a file it opened even when it is evicted meanwhile. A writer that stops
    early on its own removes its part. A part whose writer is gone (killed, or a DataLoader worker ended at exit
    mid-shard; of another host: untouched for STALE_PART_S) is a partial copy: the next reader of that shard from
    a byte it holds takes it over (renamed under the lock) and fetches only the rest; until then it is evicted like
    a whole copy. Eviction and take-overs run under a file lock.
    """

    def __init__(self, directory: str | Path, max_bytes: int):
        self.directory, self.max_bytes = Path(directory), int(max_bytes)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.evict()

    def path(self, url: str) -> Path:
        return self.directory / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".tar")

    def open(self, url: str) -> BinaryIO | None:
        """The cached copy, opened, or None."""
        path = self.path(url)
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        os.utime(path)  # recently used
        return handle

    def writer(self, url: str, size: int | None, start: int = 0) -> "CacheWriter | None":
        """Where a read of `url` (`size` bytes) from byte `start` keeps its copy: a partial copy of a gone writer
        that holds at least `start` bytes, taken over, or a new one (only for a read from the start)."""
        if size is None or size > self.max_bytes:
            return None
        stem = self.path(url).stem
        own = self.directory / f"{stem}.{socket.gethostname()}.{os.getpid()}.part"
        with self._lock():
            held = self._take_part(stem, own)
            if held is not None and not start <= held <= size:  # ends before this read begins, or not of this size
                own.unlink(missing_ok=True)
                held = None
            if held is None and start > 0:
                return None
            self._evict(reserve=size - (held or 0))  # room for the whole copy before it is written
        return CacheWriter(self, url, own, size, held or 0)

    def publish(self, part: Path, url: str) -> None:
        os.replace(part, self.path(url))
        self.evict(keep=self.path(url))

    def evict(self, keep: Path | None = None) -> None:
        with self._lock():
            self._evict(keep=keep)

    def _lock(self) -> "_FileLock":
        return _FileLock(self.directory / ".lock")

    def _evict(self, keep: Path | None = None, reserve: int = 0) -> None:
        """Least recently used whole and partial copies out until they, the parts being written and `reserve` fit
        the bound."""
        files, total = [], reserve
        for path in [*self.directory.glob("*.tar"), *self.directory.glob("*.part")]:
            try:
                stat = path.stat()
                evictable = path.suffix == ".tar" or self._gone(path)
            except FileNotFoundError:
                continue
            total += stat.st_size
            if evictable:
                files.append((stat.st_mtime, stat.st_size, path))
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size

    def _take_part(self, stem: str, own: Path) -> int | None:
        """The largest partial copy of `stem` whose writer is gone, renamed to `own`, and its bytes; others of
        `stem` whose writers are gone are removed."""
        gone = []
        for part in self.directory.glob(f"{stem}.*.part"):
            try:
                if self._gone(part):
                    gone.append((part.stat().st_size, part))
            except FileNotFoundError:
                continue
        if not gone:
            return None
        gone.sort()
        held, best = gone.pop()
        for _, part in gone:
            part.unlink(missing_ok=True)
        os.replace(best, own)
        return held

    @staticmethod
    def _gone(part: Path) -> bool:
        """Whether the writer of a `.part` is gone: of this host, its process ended; of others, untouched long."""
        host, pid = _host_pid(part.name)
        if host == socket.gethostname():
            return not (pid.isdigit() and _alive(int(pid)))
        return time.time() - part.stat().st_mtime > STALE_PART_S


class _FileLock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        self.handle = open(self.path, "a")
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        self.handle.close()  # releases the lock


def _host_pid(name: str) -> tuple[str, str]:
    """`<hash>.<host>.<pid>.part` -> (host, pid); a host name may hold dots."""
    middle = name[:-len(".part")].split(".", 1)[1] if name.count(".") >= 3 else ""
    host, _, pid = middle.rpartition(".")
    return host, pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheWriter:
    """Receives the bytes of one object as they are read (after the `written` a partial copy held already);
    publishes them once all `size` bytes arrived."""

    def __init__(self, cache: ShardCache, url: str, part: Path, size: int, written: int = 0):
        self.cache, self.url, self.part, self.size = cache, url, part, size
        self.handle = open(part, "ab" if written else "wb")
        self.written = written

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.written += len(data)

    def close(self, complete: bool) -> None:
        self.handle.close()
        if complete and self.written == self.size:
            self.cache.publish(self.part, self.url)
        else:
            self.part.unlink(missing_ok=True)
