"""`python -m stereo bench-data`: data-loading throughput on FSD-like samples, as JSON.

Writes FSD-like samples (two 540x960 JPEGs + FSD's packed PNG disparity) to a temporary shard, then measures
(1) samples/s on one core through read + decode + full augmentation to the crop, split into its stages, and
(2) for each worker count, the time the trainer waits for each batch from the real TrainLoader, with an optional
simulated training step between batches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from stereo.config.schema import AugmentConfig, DataConfig, DatasetSpec
from stereo.data.augment import Augmentor
from stereo.data.codecs import encode_fsd_png
from stereo.data.loader import build_train_loader
from stereo.data.reader import index_tar, read_indexed
from stereo.data.shards import write_shards
from stereo.data.stream import decode_checked

FSD_SIZE = (540, 960)  # H, W: FSD's 1280x720 renders as the public loaders resize them
JPEG_QUALITY = 95
MAX_DISP = 416


def _photo_like(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Smooth shapes plus fine grain: compresses like a photograph (about 150-300 KB as JPEG at 540x960)."""
    height, width = size
    image = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((6, 90.0), (40, 40.0), (200, 25.0)):
        grid = rng.uniform(-1, 1, (cells * height // width + 2, cells + 2, 3)).astype(np.float32)
        image += amplitude * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    return np.clip(image + 128, 0, 255).astype(np.uint8)


def encode_fsd_like(index: int) -> tuple[str, dict[str, bytes]]:
    rng = np.random.default_rng(index)
    left = _photo_like(rng, FSD_SIZE)
    right = np.roll(left, -int(rng.integers(5, 60)), axis=1)
    ramp = np.linspace(5, 200, FSD_SIZE[1], dtype=np.float32)[None, :]
    disp = ramp + 30 * cv2.resize(rng.uniform(-1, 1, (6, 10)).astype(np.float32), FSD_SIZE[::-1])

    def jpeg(image: np.ndarray) -> bytes:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1].tobytes()

    members = {"left.jpg": jpeg(left), "right.jpg": jpeg(right), "disp.fsd.png": encode_fsd_png(disp),
               "meta.json": json.dumps({"source": "bench", "path": f"fsd_like_{index}"}).encode()}
    return f"fsd_like_{index:05d}", members


def per_core(shard: Path, augment: Augmentor, repeats: int) -> dict[str, float]:
    """One process, one OpenCV thread: read + decode + augment, timed per stage."""
    cv2.setNumThreads(1)
    index = index_tar(str(shard))
    rng = np.random.default_rng(0)
    times = {"read": 0.0, "decode": 0.0, "augment": 0.0}
    count = 0
    with open(shard, "rb") as handle:
        for _ in tqdm(range(repeats), desc="per core", file=sys.stderr):
            for entry in index.samples:
                start = time.perf_counter()
                members = read_indexed(handle, index, entry)
                read_done = time.perf_counter()
                sample = decode_checked(members, entry.key)
                decoded = time.perf_counter()
                augment(sample, rng)
                times["read"] += read_done - start
                times["decode"] += decoded - read_done
                times["augment"] += time.perf_counter() - decoded
                count += 1
    total = sum(times.values())
    return {"samples": count, "samples_per_s": round(count / total, 1),
            **{f"{stage}_ms": round(1000 * t / count, 2) for stage, t in times.items()}}


def loader_wait(shard_dir: Path, augment_cfg: AugmentConfig, workers: int, batch_size: int, batches: int,
                step_s: float) -> dict[str, float]:
    cfg = DataConfig(train=[DatasetSpec("fsd_like", str(shard_dir))], batch_size=batch_size, num_workers=workers)
    loader = build_train_loader(cfg, augment_cfg, MAX_DISP, rank=0, world_size=1)
    waits, start = [], time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    for _ in tqdm(range(batches), desc=f"{workers} workers", file=sys.stderr):
        time.sleep(step_s)  # the training step the batch would feed
        begin = time.perf_counter()
        next(iterator)
        waits.append(time.perf_counter() - begin)
    wall = time.perf_counter() - start - first
    return {"workers": workers, "first_batch_s": round(first, 2),
            "wait_ms_median": round(1000 * statistics.median(waits), 1),
            "wait_ms_mean": round(1000 * statistics.fmean(waits), 1),
            "samples_per_s": round(batches * batch_size / wall, 1)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=16, help="distinct FSD-like samples in the temp shard")
    parser.add_argument("--repeats", type=int, default=2, help="passes over them for the per-core figure")
    parser.add_argument("--workers", default="1,2", help="DataLoader worker counts to time, comma separated")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=10, help="batches timed per worker count")
    parser.add_argument("--step-ms", type=float, default=0.0, help="simulated training step between batches")
    parser.add_argument("--crop", type=int, nargs=2, default=[320, 736], metavar=("H", "W"))
    parser.add_argument("--out", help="also write the JSON here")


def run(args: argparse.Namespace) -> int:
    augment_cfg = AugmentConfig(crop=list(args.crop))
    augment_cfg.validate()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        shard_dir = Path(tmp) / "fsd_like"
        manifest = write_shards(list(range(args.samples)), encode_fsd_like, shard_dir, "fsd_like", 1e12, 0,
                                size_of=lambda _: 1)
        shard = shard_dir / manifest["shards"][0]["name"]
        report = {
            "sample": {"size": list(FSD_SIZE), "crop": list(args.crop),
                       "bytes": round(shard.stat().st_size / args.samples)},
            "per_core": per_core(shard, Augmentor(augment_cfg, MAX_DISP), args.repeats),
            "loader": [loader_wait(shard_dir, augment_cfg, int(w), args.batch_size, args.batches, args.step_ms / 1000)
                       for w in args.workers.split(",")],
            "batch_size": args.batch_size,
            "step_ms": args.step_ms,
        }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
