"""Shards on object storage, against a real S3-compatible server (moto, its own process on 127.0.0.1) behind a
proxy that drops connections on purpose: `make shards OUT=s3://...`, streaming over s3:// and http://, resumed
range reads after dropped connections, failed shards and the failure rate, the node-local cache, and exact resume
of the loader after kill -9 at world size 2 with 2 workers per rank.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from s3server import Cut, FaultProxy, start_moto
from stereo.data.codecs import encode_png, write_pfm
from stereo.data.reader import FetchOptions, ShardFailed, iter_streamed
from stereo.data import remote
from stereo.data.remote import RangeReader, RetryPolicy, ShardCache, list_prefix, s3_client
from stereo.data.shardlist import ShardListError, resolve_shards
from stereo.data.stream import BadDataError, DatasetSource, RoleState, RoleStream

REPO = Path(__file__).resolve().parents[1]
BUCKET = "stereo-test"
SECRET = "never-written-anywhere-7f3a9c"  # the secret key the client gets from the environment
SAMPLES, SIZE = 24, (48, 64)  # about 30 KB a sample: 3 shards of 8 at SHARD_SIZE
SHARD_SIZE = "240KB"
FAST_RETRY = RetryPolicy(retries=2, backoff_s=0.01)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto behind the fault proxy; the client finds both through the environment only."""
    server, port = start_moto()
    proxy = FaultProxy(port)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_REGION", "AWS_PROFILE")}
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION="us-east-1")
    os.environ.pop("AWS_PROFILE", None)
    s3_client().create_bucket(Bucket=BUCKET)
    root = tmp_path_factory.mktemp("remote")
    listing = write_generic_set(root / "raw")
    run = subprocess.run(["make", "-s", "shards", f"PY={sys.executable}", "DATASET=generic", f"SRC={listing}",
                          f"OUT=s3://{BUCKET}/set", f"SHARD_SIZE={SHARD_SIZE}"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    local = root / "local"
    subprocess.run([sys.executable, "-m", "stereo", "shards", "--dataset", "generic", "--src", str(listing),
                    "--out", str(local), "--shard-size", SHARD_SIZE], cwd=REPO, check=True, capture_output=True)
    yield {"proxy": proxy, "moto_port": port, "local": local, "make_output": run.stdout + run.stderr, "root": root}
    proxy.stop()
    server.kill()
    server.wait()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def write_generic_set(root: Path) -> Path:
    """A generic list of SAMPLES pairs whose constant disparity (ident + 1) names the sample."""
    root.mkdir(parents=True)
    lines = []
    for ident in range(SAMPLES):
        image = np.random.default_rng(ident).integers(0, 256, SIZE + (3,), dtype=np.uint8)
        (root / f"{ident:03d}_L.png").write_bytes(encode_png(image))
        (root / f"{ident:03d}_R.png").write_bytes(encode_png(image))
        write_pfm(root / f"{ident:03d}.pfm", np.full(SIZE, ident + 1.0, np.float32))
        lines.append(f"{ident:03d}_L.png {ident:03d}_R.png {ident:03d}.pfm")
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root / "pairs.txt"


def make_public() -> None:
    for key in ["set/manifest.json"] + [f"set/{i:06d}.tar" for i in range(3)]:
        s3_client().put_object_acl(Bucket=BUCKET, Key=key, ACL="public-read")


def ident_of(sample: dict) -> int:
    return int(round(float(sample["disp"][0, 0]))) - 1


def one_epoch(source: DatasetSource) -> tuple[list[int], RoleStream]:
    stream = RoleStream([source], 0, 1, 0, 0.5, RoleState(), None)
    idents = []
    while True:
        sample = stream.next()
        if stream.state.cursors[source.name][0] > 0:
            return idents, stream
        idents.append(ident_of(sample))


def test_make_shards_uploads_to_s3_and_the_loader_streams_them(s3):
    local_manifest = json.loads((s3["local"] / "manifest.json").read_text())
    remote_manifest = json.loads(s3_client().get_object(Bucket=BUCKET, Key="set/manifest.json")["Body"].read())
    assert remote_manifest["complete"] and len(remote_manifest["shards"]) == 3
    assert [(e["name"], e["num_samples"], e["sha256"]) for e in remote_manifest["shards"]] == \
        [(e["name"], e["num_samples"], e["sha256"]) for e in local_manifest["shards"]]
    for entry in remote_manifest["shards"]:
        body = s3_client().get_object(Bucket=BUCKET, Key=f"set/{entry['name']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    assert SECRET not in s3["make_output"]

    shards = resolve_shards(f"s3://{BUCKET}/set")
    assert [(s.url, s.num_samples) for s in shards] == [(f"s3://{BUCKET}/set/{i:06d}.tar", 8) for i in range(3)]
    assert [s.url for s in resolve_shards(f"s3://{BUCKET}/set/{{000000..000002}}.tar")] == [s.url for s in shards]
    with pytest.raises(ShardListError, match=r"7 of 10 shard objects do not exist \(first: .*000003.tar\)"):
        resolve_shards(f"s3://{BUCKET}/set/{{000000..000009}}.tar")
    with pytest.raises(ShardListError, match="credentials in a shard URL"):
        resolve_shards(f"https://user:{SECRET}@example.org/set/")

    idents, _ = one_epoch(DatasetSource("s3", shards, 1.0, FetchOptions(FAST_RETRY)))
    assert sorted(idents) == list(range(SAMPLES))
    local_idents, _ = one_epoch(DatasetSource("s3", resolve_shards(str(s3["local"])), 1.0))
    assert sorted(local_idents) == list(range(SAMPLES))

    # the same shards over plain http(s), made readable without credentials
    make_public()
    over_http = resolve_shards(f"http://127.0.0.1:{s3['proxy'].port}/{BUCKET}/set/")
    assert [s.num_samples for s in over_http] == [8, 8, 8]
    idents, _ = one_epoch(DatasetSource("http", over_http, 1.0, FetchOptions(FAST_RETRY)))
    assert sorted(idents) == list(range(SAMPLES))

    # a second run keeps what the remote manifest lists: nothing is uploaded again
    proxy, before = s3["proxy"], len(s3["proxy"].gets)
    listing = s3["root"] / "raw" / "pairs.txt"
    subprocess.run([sys.executable, "-m", "stereo", "shards", "--dataset", "generic", "--src", str(listing),
                    "--out", f"s3://{BUCKET}/set", "--shard-size", SHARD_SIZE], cwd=REPO, check=True,
                   capture_output=True)
    assert not [path for path, _ in proxy.gets[before:] if path.endswith(".tar")]


def _upload(src: Path, out: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "shards-upload", f"PY={sys.executable}", f"SRC={src}", f"OUT={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_make_shards_upload_puts_built_shards_on_s3_and_checks_their_sizes(s3, monkeypatch):
    """Shards built locally go up with their manifest (last); the loader streams them; a re-run uploads only what
    is missing or differs; a source that does not match its manifest and a missing bucket exit 2; an object whose
    size does not match after upload keeps the manifest from going up."""
    local, out = s3["local"], f"s3://{BUCKET}/uploaded"
    done = _upload(local, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{out}: 3 shards uploaded, 0 already there, sizes checked, manifest uploaded (24 samples)" in done.stderr
    assert SECRET not in done.stdout + done.stderr
    shards = resolve_shards(out)
    assert [s.num_samples for s in shards] == [8, 8, 8]
    for i in range(3):
        body = s3_client().get_object(Bucket=BUCKET, Key=f"uploaded/{i:06d}.tar")["Body"].read()
        assert body == (local / f"{i:06d}.tar").read_bytes()
    idents, _ = one_epoch(DatasetSource("uploaded", shards, 1.0, FetchOptions(FAST_RETRY)))
    assert sorted(idents) == list(range(SAMPLES))

    # an object replaced by other bytes of the same size, or cut short, is uploaded again; the others are kept
    size = (local / "000001.tar").stat().st_size
    s3_client().put_object(Bucket=BUCKET, Key="uploaded/000001.tar", Body=b"x" * size)
    s3_client().put_object(Bucket=BUCKET, Key="uploaded/000002.tar", Body=b"short")
    done = _upload(local, out)
    assert done.returncode == 0 and "2 shards uploaded, 1 already there" in done.stderr, done.stderr[-3000:]
    for i in (1, 2):
        assert s3_client().get_object(Bucket=BUCKET, Key=f"uploaded/{i:06d}.tar")["Body"].read() == \
            (local / f"{i:06d}.tar").read_bytes()

    done = _upload(local, "s3://no-such-bucket-29/x")
    assert done.returncode == 2 and "s3://no-such-bucket-29/x/000000.tar: NoSuchBucket (HTTP 404): the bucket " \
        "does not exist" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    broken = s3["root"] / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text((local / "manifest.json").read_text())
    for i in range(3):
        (broken / f"{i:06d}.tar").write_bytes((local / f"{i:06d}.tar").read_bytes()[:-512 if i == 1 else None])
    done = _upload(broken, f"s3://{BUCKET}/broken")
    assert done.returncode == 2 and f"{broken}/000001.tar: the manifest lists {size} bytes but the file has " \
        f"{size - 512} bytes" in done.stderr, done.stderr[-3000:]
    assert not list_prefix(f"s3://{BUCKET}/broken/")

    from stereo.data import upload

    def truncating(path, url, metadata=None):  # a transfer that loses the file's end on the way
        remote.upload_file(Path(path).with_name("short"), url, metadata)

    (broken / "000001.tar").unlink()
    (broken / "short").write_bytes(b"short")
    (broken / "000001.tar").write_bytes((local / "000001.tar").read_bytes())
    monkeypatch.setattr(upload, "upload_file", truncating)
    with pytest.raises(upload.UploadError, match=rf"3 uploaded shards do not match their files \(s3://{BUCKET}/"
                                                 r"broken/000000.tar: 5 bytes, expected \d+.*manifest was not "):
        upload.upload_shards(broken, f"s3://{BUCKET}/broken", progress=False)
    assert f"s3://{BUCKET}/broken/manifest.json" not in list_prefix(f"s3://{BUCKET}/broken/")


def test_dropped_connections_resume_with_range_requests(s3):
    """Three drops in one object: the reader re-opens at the byte where each stopped; nothing lost or doubled."""
    proxy, url = s3["proxy"], f"s3://{BUCKET}/set/000001.tar"
    expected = (s3["local"] / "000001.tar").read_bytes()
    proxy.cuts = {"set/000001.tar": [20000, 45000, 5000]}
    before = len(proxy.gets)
    with RangeReader(url, 0, FAST_RETRY) as reader:
        assert reader.read() == expected
        assert reader.retried == 3
    ranges = [r for path, r in proxy.gets[before:] if path.endswith("000001.tar")]
    assert ranges == ["bytes=0-", "bytes=20000-", "bytes=65000-", "bytes=70000-"]
    with RangeReader(url, len(expected) - 100, FAST_RETRY) as reader:
        assert reader.read() == expected[-100:]
    with RangeReader(url, len(expected), FAST_RETRY) as reader:  # a resume right at the end reads nothing
        assert reader.read() == b""

    make_public()
    for source in (f"s3://{BUCKET}/set", f"http://127.0.0.1:{proxy.port}/{BUCKET}/set/"):
        for index in range(3):
            proxy.cuts[f"set/{index:06d}.tar"] = [30000, 60000]
        idents, stream = one_epoch(DatasetSource("cut", resolve_shards(source), 1.0, FetchOptions(FAST_RETRY)))
        assert sorted(idents) == list(range(SAMPLES)), source
        assert not any(proxy.cuts.values())  # every planned drop happened
        assert stream.state.retries == 6 and stream.state.to_dict()["retries"] == 6  # counted, and saved


BIG_MEMBER = 500_000  # 9 samples of 500 KB: a 4.5 MB object, several times tarfile's 1 MiB read buffer
# a stall is noticed after 2 s (the proxy stalls 6 s); long enough that a loaded CI machine does not stall by itself
STALL_TIMEOUT = RetryPolicy(retries=2, backoff_s=0.01, timeout_s=2.0)


@pytest.fixture(scope="module")
def big_object(s3):
    """A shard of incompressible members, uploaded, and its samples as an uncut read gives them."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ident in range(9):
            for ext in ("left.bin", "right.bin"):
                data = np.random.default_rng([ident, len(ext)]).bytes(BIG_MEMBER // 2)
                info = tarfile.TarInfo(f"{ident:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    body = buffer.getvalue()
    s3_client().put_object(Bucket=BUCKET, Key="big/000000.tar", Body=body)
    url = f"s3://{BUCKET}/big/000000.tar"
    s3["proxy"].cuts = {}
    uncut = list(iter_streamed(url, 0, FetchOptions(FAST_RETRY)))
    assert len(uncut) == 9 and all(isinstance(item, tuple) for item in uncut)
    return {"url": url, "body": body, "uncut": uncut}


PLANS = {  # bytes each connection delivers before its cut, below and above the 1 MiB buffer (0: none at all)
    "reset": [300_000] * 6 + [1_100_000, 0, 1_048_577],
    "stall": [300_000, 1_100_000, 0],
    "close": [300_000] * 6 + [1_500_000, 0, 200_000],
}


@pytest.mark.parametrize("how,scheme", [(how, "s3") for how in sorted(PLANS)] + [("reset", "http"),
                                                                                   ("stall", "http")])
def test_cut_and_stalled_reads_resume_at_the_next_byte_bit_identically(s3, big_object, how, scheme, tmp_path,
                                                                        caplog, monkeypatch):
    """Each broken connection keeps the bytes it delivered and the read goes on from the next byte; retries run out
    only after failures without progress (here 6 cuts in a row with a budget of 2 still get through), the stream of
    samples and the cached copy equal the uncut read's, each reconnect is logged with the shard, byte and cause,
    and counted. Over s3:// (boto3) and http:// (requests) alike."""
    proxy, url, plan = s3["proxy"], big_object["url"], PLANS[how]
    if scheme == "http":
        s3_client().put_object_acl(Bucket=BUCKET, Key="big/000000.tar", ACL="public-read")
        url = f"http://127.0.0.1:{proxy.port}/{BUCKET}/big/000000.tar"
    proxy.cuts = {"big/000000.tar": [Cut(at, how) for at in plan]}
    before, retries = len(proxy.gets), []
    options = FetchOptions(STALL_TIMEOUT if how == "stall" else FAST_RETRY, ShardCache(tmp_path, 10**8))
    monkeypatch.setattr(remote, "RECONNECTS", remote._ReconnectLog())  # this process's log budget, fresh
    with caplog.at_level(logging.WARNING, logger="stereo.data.remote"):
        items = list(iter_streamed(url, 0, options, on_retry=lambda: retries.append(1)))
    assert not proxy.cuts["big/000000.tar"], "every planned cut happened"
    assert items == big_object["uncut"]
    assert [p.read_bytes() for p in tmp_path.glob("*.tar")] == [big_object["body"]]
    assert not list(tmp_path.glob("*.part"))
    assert len(retries) == len(plan)
    starts = [int(r.split("=")[1].rstrip("-")) for p, r in proxy.gets[before:] if p.endswith("big/000000.tar")]
    assert starts == [sum(plan[:i]) for i in range(len(plan) + 1)]  # each from the next byte, none twice
    reconnects = [r.getMessage() for r in caplog.records if "reconnecting to" in r.getMessage()]
    assert len(reconnects) == min(len(plan), remote.RECONNECT_LOG_FIRST)  # then one line a minute at most
    assert reconnects and f"reconnecting to {url} at byte {starts[1]} (failure 1 in a row" in reconnects[0]
    if how == "stall":
        assert "stalled: no byte within the read timeout" in reconnects[0]
    endpoint = os.environ["AWS_ENDPOINT_URL"].split("//")[1]
    assert not [line.split(url)[1] for line in reconnects if endpoint in line.split(url)[1]]  # only in an http URL
    proxy.cuts = {}


def test_reads_without_progress_give_up_and_a_stall_before_any_byte_counts_as_one(s3, big_object):
    """Failures in a row without a byte between them use up the budget (retries=2: the third gives up)."""
    proxy, url = s3["proxy"], big_object["url"]
    proxy.cuts = {"big/000000.tar": [Cut(2_000_000, "reset"), Cut(0, "stall"), Cut(0, "reset"), Cut(0, "close")]}
    items = list(iter_streamed(url, 0, FetchOptions(STALL_TIMEOUT)))
    assert items[:-1] == big_object["uncut"][:len(items) - 1] and 3 <= len(items) - 1 < 9
    assert isinstance(items[-1], ShardFailed) and "gave up after 2 retries without progress" in items[-1].detail
    proxy.cuts = {}


def test_missing_bucket_prefix_or_object_exits_2_before_the_run_directory_exists(s3, big_object, tmp_path):
    """`train` and `submit` check remote sources like local ones (a manifest read or a listing each): exit 2 naming
    each URL and what is missing; `submit --no-check-paths` leaves them to the compute nodes."""
    sources = {"nobucket": "s3://no-such-bucket-29/set", "noprefix": f"s3://{BUCKET}/nothing",
               "nomanifest": f"s3://{BUCKET}/big", "noobject": f"s3://{BUCKET}/set/{{000000..000004}}.tar"}
    specs = ", ".join(f"{{name: {name}, shards: '{url}'}}" for name, url in sources.items())
    overrides = [f"data.train=[{specs}]", f"train.run_dir={tmp_path}/run", f"slurm.folder={tmp_path}/slurm"]
    expected = {"nobucket": "s3://no-such-bucket-29/set/manifest.json: NoSuchBucket (HTTP 404): the bucket does "
                            "not exist",
                "noprefix": f"nothing under s3://{BUCKET}/nothing/ (no such prefix)",
                "nomanifest": f"no manifest.json under s3://{BUCKET}/big/ (it holds e.g. {big_object['url']})",
                "noobject": f"2 of 5 shard objects do not exist (first: s3://{BUCKET}/set/000003.tar)"}
    for command in (["train"], ["submit"]):
        done = subprocess.run([sys.executable, "-m", "stereo", *command, "tiny", *overrides], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        message = done.stderr.strip().splitlines()[-1]
        assert message.startswith("config error: data.train[0].shards: s3://no-such-bucket-29/set: "), message
        for index, (name, what) in enumerate(expected.items()):
            problem = message.split(f"data.train[{index}].shards: ", 1)[1]
            assert problem.startswith(f"{sources[name]}: ") and what in problem.split("; data.")[0], (name, message)
        assert "Traceback" not in done.stderr and SECRET not in done.stderr
        assert not (tmp_path / "run").exists() and not (tmp_path / "slurm").exists()
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    done = subprocess.run([sys.executable, "-m", "stereo", "submit", "--no-check-paths", "tiny", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1 and "cannot reach Slurm" in done.stderr, done.stderr[-3000:]  # past the check


def test_read_timeout_is_a_validated_config_key_that_reaches_the_reader():
    from stereo.config.errors import ConfigError
    from stereo.config.schema import DataConfig
    from stereo.data.loader import fetch_options

    assert fetch_options(DataConfig(read_timeout_s=0.4)).retry == RetryPolicy(5, 1.0, 0.4)
    with pytest.raises(ConfigError, match=r"data.read_timeout_s.*> 0 seconds, got 0"):
        DataConfig(read_timeout_s=0).validate()


def test_a_shard_that_keeps_failing_is_skipped_and_too_many_stop(s3, caplog):
    proxy, shards = s3["proxy"], resolve_shards(f"s3://{BUCKET}/set")
    fetch = FetchOptions(FAST_RETRY, max_failed_rate=0.4)
    # shard 0: the first connection drops after 100 KB, every retry then gets no byte: the budget runs out
    proxy.cuts = {"set/000000.tar": [100_000] + [0] * (FAST_RETRY.retries + 1)}
    idents, stream = one_epoch(DatasetSource("flaky", shards, 1.0, fetch))
    assert stream.state.bad == {"failed_shards": 1}
    assert stream.state.opened_shards == 4  # the epoch's 3 and the first of the next
    assert len(idents) == len(set(idents))  # the samples read before the failure count once, and only once
    lost = set(range(8)) - set(idents)
    assert set(range(8, SAMPLES)) <= set(idents) and 0 < len(lost) < 8
    assert "shard failed" in caplog.text and "000000.tar" in caplog.text
    assert "gave up after 2 retries without progress" in caplog.text

    proxy.cuts = {f"set/{i:06d}.tar": [0] * 10 for i in (0, 2)}
    with pytest.raises(BadDataError, match=r"2 of [23] shards opened by role 0 could not be read .*"
                                           r"max_failed_shard_rate=0.4"):
        one_epoch(DatasetSource("broken", shards, 1.0, fetch))
    proxy.cuts = {}


def _read_through_cache(urls: list[str], cache_dir: str, max_bytes: int) -> None:
    options = FetchOptions(FAST_RETRY, ShardCache(cache_dir, max_bytes))
    for url in urls:
        assert not [item for item in iter_streamed(url, 0, options) if not isinstance(item, tuple)]


def test_cache_is_bounded_and_safe_with_concurrent_writers(s3, tmp_path):
    """Four processes stream the same shards through one cache at once; it ends with whole, correct copies
    within its bound, and a cached shard is read without a request."""
    urls = [f"s3://{BUCKET}/set/{i:06d}.tar" for i in range(3)]
    sizes = [(s3["local"] / f"{i:06d}.tar").stat().st_size for i in range(3)]
    bound = sizes[0] + sizes[1] + sizes[2] // 2  # room for two shards
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_read_through_cache, args=(urls[i % 3:] + urls[:i % 3], str(tmp_path), bound))
             for i in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    cache = ShardCache(tmp_path, bound)
    cached = sorted(tmp_path.glob("*.tar"))
    # room for two; one when the last copy was published while other writers' parts (counted in the bound) were open
    assert 1 <= len(cached) <= 2 and sum(p.stat().st_size for p in cached) <= bound, [p.name for p in cached]
    assert not list(tmp_path.glob("*.part"))
    local = {hashlib.sha256((s3["local"] / f"{i:06d}.tar").read_bytes()).hexdigest() for i in range(3)}
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in cached} <= local
    hit = next(url for url in urls if cache.path(url).exists())
    before = len(s3["proxy"].gets)
    _read_through_cache([hit], str(tmp_path), bound)
    assert len(s3["proxy"].gets) == before  # served from the node-local copy

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{cache.path(hit).stem}.{socket.gethostname()}.{dead.pid}.part"
    stale.write_bytes(b"left by a killed worker")
    cache.evict()
    assert stale.exists()  # a partial copy, within the bound
    ShardCache(tmp_path, 10)
    assert not stale.exists() and not list(tmp_path.glob("*.tar"))  # over the bound: evicted like whole copies


PARTIAL_READ = r"""
import os, sys
from stereo.data.reader import FetchOptions, iter_streamed
from stereo.data.remote import RetryPolicy, ShardCache
items = iter_streamed(sys.argv[1], 0, FetchOptions(RetryPolicy(), ShardCache(sys.argv[2], 10**8)))
next(items)  # one sample of nine, then the process ends as a DataLoader worker does at exit: nothing cleans up
sys.stdout.flush()
os._exit(0)
"""


def _ranges(proxy: FaultProxy, before: int, key: str) -> list[str]:
    return [r for path, r in proxy.gets[before:] if path.endswith(key)]


def test_cache_resumes_partial_copies_left_by_ended_processes_and_counts_them_in_the_bound(s3, big_object,
                                                                                          tmp_path):
    """A process that ends mid-shard (as DataLoader workers do at exit) leaves a partial copy; the next read of
    that shard from a byte it holds takes it over and fetches only the rest, ending bit-identical with a whole
    copy; one that starts past it removes it. Partial copies count in the bound; a live writer's are kept."""
    proxy, url, body, uncut = s3["proxy"], big_object["url"], big_object["body"], big_object["uncut"]
    key = "big/000000.tar"

    def leave_part() -> int:
        for copy in tmp_path.glob("*.tar"):
            copy.unlink()
        subprocess.run([sys.executable, "-c", PARTIAL_READ, url, str(tmp_path)], cwd=REPO, check=True, timeout=120)
        parts = list(tmp_path.glob("*.part"))
        assert len(parts) == 1 and 0 < parts[0].stat().st_size < len(body)
        return parts[0].stat().st_size

    for start_sample in (0, 1):  # the next epoch reads it from the start; a resumed run from a sample's end
        held = leave_part()
        start = uncut[start_sample - 1][2] if start_sample else 0
        assert start < held
        before = len(proxy.gets)
        items = list(iter_streamed(url, start, FetchOptions(FAST_RETRY, ShardCache(tmp_path, 10**8))))
        assert items == uncut[start_sample:]
        assert _ranges(proxy, before, key)[-1] == f"bytes={held}-"  # only the rest came over the network
        assert [p.read_bytes() for p in tmp_path.glob("*.tar")] == [body] and not list(tmp_path.glob("*.part"))

    held = leave_part()
    late = next(i for i, item in enumerate(uncut) if item[2] > held)  # a read that starts past the partial copy
    items = list(iter_streamed(url, uncut[late][2], FetchOptions(FAST_RETRY, ShardCache(tmp_path, 10**8))))
    assert items == uncut[late + 1:] and not list(tmp_path.glob("*.part")) and not list(tmp_path.glob("*.tar"))

    held = leave_part()
    ShardCache(tmp_path, held - 1)  # the next run's cache, smaller: the partial copy is evicted
    assert not list(tmp_path.glob("*.part"))

    # another host's part: kept while it is being written (and counted), a partial copy once untouched long
    cache = ShardCache(tmp_path, 10**8)
    other = tmp_path / f"{cache.path(url).stem}.other-node.example.org.42.part"
    other.write_bytes(body[:700_000])
    ShardCache(tmp_path, 10)
    assert other.exists()
    old = time.time() - remote.STALE_PART_S - 10
    os.utime(other, (old, old))
    before = len(proxy.gets)
    items = list(iter_streamed(url, 0, FetchOptions(FAST_RETRY, cache)))
    assert items == uncut and _ranges(proxy, before, key)[-1] == "bytes=700000-"
    assert not other.exists() and [p.read_bytes() for p in tmp_path.glob("*.tar")] == [body]

    # a live writer's part counts: the copies make room for it, and for the copy about to be written
    size = len(body)
    live = tmp_path / f"{'0' * 32}.{socket.gethostname()}.{os.getpid()}.part"
    live.write_bytes(b"x" * 1000)
    ShardCache(tmp_path, size + 999)
    assert live.exists() and not list(tmp_path.glob("*.tar"))
    live.unlink()
    small = ShardCache(tmp_path, size + 999)
    _read_through_cache([url], str(tmp_path), size + 999)
    writer = small.writer(f"s3://{BUCKET}/set/000000.tar", 1000)  # reserving 1000 bytes evicts the big copy
    assert not list(tmp_path.glob("*.tar"))
    writer.close(complete=False)
    assert not list(tmp_path.glob("*.part"))


LOADER_RUN = r"""
import hashlib, json, os, sys
from stereo.config.schema import AugmentConfig, DataConfig, DatasetSpec
from stereo.data.loader import build_train_loader
import time
rank, out, total, resume, cache = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
pace = float(sys.argv[7])  # seconds per batch: a slow consumer, so the kill finds batches prefetched
cfg = DataConfig(train=[DatasetSpec("s3", sys.argv[6])], batch_size=2, num_workers=2, seed=5,
                 shard_retries=2, retry_backoff_s=0.01, cache_dir=cache or None)
loader = build_train_loader(cfg, AugmentConfig(crop=[32, 32]), 512, rank, 2)
done = 0
if resume:
    last = json.loads(open(out).read().splitlines()[-1])
    loader.load_state_dict(last["state"])
    done = last["batch"] + 1
with open(out, "a") as log:
    for batch in loader:
        digest = hashlib.sha256(b"".join(batch[k].numpy().tobytes() for k in ("left", "right", "disp", "valid")))
        log.write(json.dumps({"batch": done, "digest": digest.hexdigest(), "state": loader.state_dict()}) + "\n")
        log.flush()
        os.fsync(log.fileno())
        done += 1
        if done == total:
            break
        time.sleep(pace)
"""


def _loader_run(rank: int, out: Path, total: int, resume: bool, cache: str, source: str, pace: float = 0.0,
                ) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOADER_RUN, str(rank), str(out), str(total), "1" if resume else "0",
                             cache, source, str(pace)], cwd=REPO, start_new_session=True, env=os.environ.copy())


def _digests(path: Path) -> list[str]:
    return [json.loads(line)["digest"] for line in path.read_text().splitlines()]


def _wait_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        assert proc.wait(300) == 0


def test_remote_exact_resume_after_kill9_at_world_size_2_with_2_workers(s3, tmp_path):
    """4 lanes on 3 shards (each split into 2 parts): both ranks killed with -9 mid-shard and resumed from their
    last saved state (remote reads restart at the saved byte offset; rank 1 also through the cache) give the
    batches of the uninterrupted run."""
    total, source, cache = 10, f"s3://{BUCKET}/set", str(tmp_path / "cache")
    straight = [tmp_path / f"straight{rank}" for rank in range(2)]
    killed = [tmp_path / f"killed{rank}" for rank in range(2)]
    _wait_all([_loader_run(rank, straight[rank], total, False, "", source) for rank in range(2)])
    procs = [_loader_run(rank, killed[rank], total, False, cache if rank else "", source, pace=2.0)
             for rank in range(2)]
    deadline = time.time() + 300
    for rank, proc in enumerate(procs):
        while not killed[rank].exists() or len(killed[rank].read_text().splitlines()) < 3 + rank:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the rank and its two loader workers
        proc.wait()
    heads = [len(_digests(path)) for path in killed]
    assert max(heads) < total
    _wait_all([_loader_run(rank, killed[rank], total, True, cache if rank else "", source) for rank in range(2)])
    for rank in range(2):
        assert _digests(killed[rank]) == _digests(straight[rank]), f"rank {rank}, killed after {heads[rank]}"
    offsets = [c[4] for path in killed for line in path.read_text().splitlines()
               for lane in json.loads(line)["state"]["lane_states"].values() for c in lane["cursors"].values()]
    assert any(offsets), "remote cursors carry byte offsets"
    assert list(Path(cache).glob("*.tar"))


def test_training_on_s3_shards_writes_no_endpoint_or_credentials(s3, tmp_path):
    """A real (tiny) training run streams its data from the S3 server; the secret key and the endpoint, given in
    the environment only, appear in no file of the run directory (config.yaml, metrics, wandb) nor in its log."""
    run_dir = tmp_path / "run"
    s3["proxy"].cuts = {f"set/{i:06d}.tar": [Cut(40_000, "stall")] for i in range(3)}  # the shard read first
    overrides = ["data.retry_backoff_s=0.01", "data.read_timeout_s=2", "augment.crop=[32,64]", "data.batch_size=1",
                 "data.num_workers=1",
                 "model.train_iters=1",
                 "model.valid_iters=1", "train.steps=2", "checkpoint.every=2", "logging.every=1",
                 "train.val_every=1000", "data.val=[]", "logging.wandb=offline", "schedule.warmup_steps=1",
                 f"data.train=[{{name: s3, shards: 's3://{BUCKET}/set'}}]", f"train.run_dir={run_dir}"]
    run = subprocess.run([sys.executable, "-m", "stereo", "train", "tiny", *overrides], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 2 in [r.get("step") for r in records]
    assert [r["data/retries"] for r in records if "loss" in r][-1] >= 1  # beside bad_samples/failed_shards
    # the stall is noticed after data.read_timeout_s (the proxy would close it only after 6 s)
    assert f"reconnecting to s3://{BUCKET}/set/" in run.stderr and "at byte 40000" in run.stderr
    assert "stalled: no byte within the read timeout" in run.stderr
    s3["proxy"].cuts = {}
    assert f"s3://{BUCKET}/set" in (run_dir / "config.yaml").read_text()
    endpoint = os.environ["AWS_ENDPOINT_URL"].split("//")[1]
    assert (run_dir / "wandb").is_dir()
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data and endpoint.encode() not in data, path
    assert SECRET not in run.stdout + run.stderr and endpoint not in run.stdout + run.stderr
