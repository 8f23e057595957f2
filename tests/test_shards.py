"""raw data set -> tar shards -> read back; planning, bad samples, interrupted and resumed writing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fakedata import make_fsd, make_kitti15
from stereo.data.sample import BadSample, decode_sample, encode_checked
from stereo.data.shards import ShardWriteError, parse_size, plan_shards, write_shards
from stereo.data.sources import SOURCES, load_raw

ROOT = Path(__file__).resolve().parents[1]


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, grouping members the WebDataset way (key = name up to the basename's first dot)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            folder, _, base = member.name.rpartition("/")
            stem, ext = base.split(".", 1)
            key = f"{folder}/{stem}" if folder else stem
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def read_all(out: Path) -> dict[str, dict[str, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    everything: dict[str, dict[str, bytes]] = {}
    for entry in manifest["shards"]:
        shard = read_shard(out / entry["name"])
        assert len(shard) == entry["num_samples"]
        assert (out / entry["name"]).stat().st_size == entry["bytes"]
        assert not set(shard) & set(everything), "a sample written twice"
        everything.update(shard)
    assert len(everything) == manifest["num_samples"]
    return everything


def test_cli_fsd_roundtrip_keeps_bytes_and_pixels(tmp_path: Path):
    fake = make_fsd(tmp_path / "fsd")
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "stereo", "shards", "--dataset", "fsd", "--src", str(fake.root),
                           "--out", str(out), "--shard-size", "2KB", "--workers", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "fsd" and manifest["complete"] and manifest["num_samples"] == 3
    assert len(manifest["shards"]) >= 2 and [e["name"] for e in manifest["shards"]][0] == "000000.tar"
    assert not list(out.glob("*.tmp"))
    stored = read_all(out)
    for raw in SOURCES["fsd"].list_samples(fake.root):
        members = stored[raw.key]
        assert set(members) == {"left.jpg", "right.jpg", "disp.fsd.png", "meta.json"}
        assert members["left.jpg"] == Path(raw.left).read_bytes()  # never re-encoded
        assert members["disp.fsd.png"] == Path(raw.target).read_bytes()
        got, want = decode_sample(members, raw.key), load_raw(raw)
        np.testing.assert_array_equal(got["left"], want["left"])
        np.testing.assert_array_equal(got["disp"], want["disp"])
        assert got["meta"]["path"] == raw.left and got["meta"]["source"] == "fsd"


def test_masks_and_disparity_survive_sharding(tmp_path: Path):
    fake = make_kitti15(tmp_path / "kitti")
    samples = SOURCES["kitti15"].list_samples(fake.root)
    manifest = write_shards(samples, encode_checked, tmp_path / "out", "kitti15", shard_bytes="1MB", workers=0)
    assert len(manifest["shards"]) == 1 and manifest["num_samples"] == 3
    stored = read_all(tmp_path / "out")
    truth = fake.by_left()
    for raw in samples:
        sample = decode_sample(stored[raw.key], raw.key)
        np.testing.assert_array_equal(sample["left"], truth[raw.left].left_rgb)
        np.testing.assert_allclose(sample["disp"], truth[raw.left].disp)
        np.testing.assert_array_equal(sample["nocc"], truth[raw.left].nocc)


def test_bad_samples_are_reported_and_skipped(tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    fake = make_fsd(tmp_path / "fsd")
    samples = SOURCES["fsd"].list_samples(fake.root)
    Path(samples[0].target).write_bytes(b"\x89PNG truncated")
    Path(samples[1].right).unlink()
    manifest = write_shards(samples, encode_checked, tmp_path / "out", "fsd", workers=0)
    assert manifest["num_samples"] == 1 and manifest["complete"]
    bad = {b["path"]: b["reason"] for b in manifest["bad_samples"]}
    assert "not a decodable PNG" in bad[samples[0].left]
    assert bad[samples[1].right].startswith("cannot read")
    assert list(read_all(tmp_path / "out")) == [samples[2].key]
    err = capfd.readouterr().err
    assert f"bad sample {samples[0].left}" in err and f"bad sample {samples[1].right}" in err


def test_negative_and_empty_disparity_are_bad(tmp_path: Path):
    fake = make_fsd(tmp_path / "fsd")
    raw = SOURCES["fsd"].list_samples(fake.root)[0]
    from stereo.data.codecs import encode_fsd_png
    Path(raw.target).write_bytes(encode_fsd_png(np.zeros((12, 20), np.float32)))
    with pytest.raises(BadSample, match="no valid disparity pixel"):
        encode_checked(raw)


def test_plan_is_deterministic_and_sized():
    assert plan_shards([4, 4, 4, 4, 4], 8) == [range(0, 2), range(2, 4), range(4, 5)]
    assert plan_shards([20, 1, 1], 8) == [range(0, 1), range(1, 3)]
    assert parse_size("1GB") == 10**9 and parse_size("64MiB") == 64 * 2**20 and parse_size("1e6") == 10**6
    with pytest.raises(ValueError, match="shard size '1 parsec'"):
        parse_size("1 parsec")


# --- interruption ---------------------------------------------------------------------------------------------


def encode_number(item: tuple[int, str]) -> tuple[str, dict[str, bytes]]:
    """Items are (number, die_marker): the worker dies abruptly on item 7 while the marker file exists."""
    number, marker = item
    if number == 7 and os.path.exists(marker):
        os._exit(1)
    return f"s{number:04d}", {"txt": str(number).encode() * 50}


def test_killed_worker_then_rerun_completes_without_duplicates(tmp_path: Path):
    marker = tmp_path / "die"
    marker.touch()
    items = [(n, str(marker)) for n in range(12)]
    out = tmp_path / "out"
    with pytest.raises(ShardWriteError, match="worker died.*run the same command again"):
        write_shards(items, encode_number, out, "numbers", shard_bytes=200, workers=2, size_of=lambda _: 100)
    first = json.loads((out / "manifest.json").read_text())
    assert not first["complete"] and first["planned_shards"] == 6
    assert "000003.tar" not in [e["name"] for e in first["shards"]]  # the shard holding item 7
    kept = {e["name"]: (out / e["name"]).stat().st_mtime_ns for e in first["shards"]}

    marker.unlink()
    final = write_shards(items, encode_number, out, "numbers", shard_bytes=200, workers=2, size_of=lambda _: 100)
    assert final["complete"] and final["num_samples"] == 12 and len(final["shards"]) == 6
    assert sorted(read_all(out)) == [f"s{n:04d}" for n in range(12)]
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())  # finished ones kept
    assert not list(out.glob("*.tmp"))


def test_leftover_tmp_and_damaged_shard_are_rewritten(tmp_path: Path):
    items = [(n, "") for n in range(6)]
    out = tmp_path / "out"
    write_shards(items, encode_number, out, "numbers", shard_bytes=200, workers=0, size_of=lambda _: 100)
    (out / "000001.tar").write_bytes(b"half a shard")  # damaged after the fact
    (out / "000002.tar.tmp").write_bytes(b"interrupted")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:2]  # as if the run stopped before shard 2 was listed
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    final = write_shards(items, encode_number, out, "numbers", shard_bytes=200, workers=0, size_of=lambda _: 100)
    assert final["complete"] and sorted(read_all(out)) == [f"s{n:04d}" for n in range(6)]
    assert not (out / "000002.tar.tmp").exists()
    with pytest.raises(ShardWriteError, match="different plan"):
        write_shards(items, encode_number, out, "numbers", shard_bytes=300, workers=0, size_of=lambda _: 100)


def test_cli_source_options_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from fakedata import make_sintel
    from stereo.cli import main

    make_sintel(tmp_path / "sintel")
    out = tmp_path / "out"
    assert main(["shards", "--dataset", "sintel", "--src", str(tmp_path / "sintel"), "--out", str(out),
                 "--workers", "0", "--option", "passes=final"]) == 0
    assert sorted(read_all(out)) == ["final/alley_1/frame_0001", "final/alley_1/frame_0002",
                                     "final/bamboo_2/frame_0001"]
    assert main(["shards", "--dataset", "sintel", "--src", str(tmp_path / "sintel"), "--out", str(out),
                 "--option", "split=test"]) == 2
    assert "sintel: unknown option(s) split (options: passes)" in capsys.readouterr().err
    assert main(["shards", "--dataset", "kitti15", "--src", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "kitti15: " in capsys.readouterr().err


def test_mask_members_are_8bit_0_255_for_an_outside_reader(tmp_path: Path):
    """KITTI's nocc comes from the 16-bit disp_noc file and a user's mask may be RGB: the stored members are the
    documented 8-bit single-channel 0/255 PNGs, as any PNG reader sees them."""
    import cv2

    from fakedata import make_generic

    kitti = make_kitti15(tmp_path / "kitti")
    generic = make_generic(tmp_path / "generic")
    mask_line = next(line for line in generic.root.read_text().splitlines() if "masks/" in line)
    mask_path = generic.root.parent / mask_line.split()[3]
    gray = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(mask_path), cv2.merge([gray // 2, gray // 3, gray]))  # an RGB mask, non-zero where valid
    for name, fake, member in (("kitti15", kitti, "nocc.png"), ("generic", generic, "valid.png")):
        samples = SOURCES[name].list_samples(fake.root)
        write_shards(samples, encode_checked, tmp_path / f"out_{name}", name, workers=0)
        stored = read_all(tmp_path / f"out_{name}")
        masked = [raw for raw in samples if member in stored[raw.key]]
        assert masked, f"{name}: no {member} member"
        for raw in masked:
            outside = cv2.imdecode(np.frombuffer(stored[raw.key][member], np.uint8), cv2.IMREAD_UNCHANGED)
            assert outside.dtype == np.uint8 and outside.ndim == 2 and set(np.unique(outside)) <= {0, 255}
            truth = fake.by_left()[raw.left]
            expected = truth.nocc if member == "nocc.png" else truth.disp > 0
            np.testing.assert_array_equal(outside == 255, expected)


def test_generic_list_negative_disparity_marks_invalid_pixels(tmp_path: Path):
    """docs/data.md: in a user's PFM, inf and <= 0 (e.g. -1) are invalid; a public set's negative disparity is
    still refused as a sign or view mix-up."""
    import dataclasses

    from fakedata import make_generic
    from stereo.data.codecs import read_pfm, write_pfm

    fake = make_generic(tmp_path / "generic")
    raw = next(r for r in SOURCES["generic"].list_samples(fake.root) if r.target.endswith(".pfm"))
    disp = read_pfm(raw.target)
    disp[:, :5] = -1.0
    write_pfm(raw.target, disp)
    key, members = encode_checked(raw)
    sample = decode_sample(members, key)
    assert not sample["valid"][:, :5].any() and sample["valid"][:, 5:].all()
    with pytest.raises(BadSample, match="60 pixels with negative disparity"):
        encode_checked(dataclasses.replace(raw, negative_invalid=False))
