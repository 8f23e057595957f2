"""`python -m stereo bench-data`: data-loading throughput on FSD-like samples at FSD's native 1280x720.

Writes FSD-like samples (two 1280x720 JPEGs + FSD's packed PNG disparity of about 0.4 MB) to a temporary shard,
then measures on one core (1) our read + decode + augmentation to the crop, per stage, and (2) a plain cv2 loader
on the same members in the same loop (decode everything, colour jitter on the whole images, resize, crop: the
straightforward way), and prints the ratio; then (3) for each worker count, the time the trainer waits for each
batch from the real TrainLoader, with an optional simulated training step between batches. Prints a table;
`--out` also writes the figures as JSON.
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

FSD_SIZE = (720, 1280)  # H, W: FSD's native resolution
JPEG_QUALITY = 95
MAX_DISP = 416


def _photo_like(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Smooth shapes plus fine grain: compresses like a photograph (about 350 KB as JPEG at 1280x720)."""
    height, width = size
    image = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((6, 90.0), (40, 40.0), (200, 25.0)):
        grid = rng.uniform(-1, 1, (cells * height // width + 2, cells + 2, 3)).astype(np.float32)
        image += amplitude * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    return np.clip(image + 128, 0, 255).astype(np.uint8)


def _fsd_like_disparity(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A slanted ground and 15-25 slanted objects: as a packed PNG about the size of FSD's (0.4-0.5 MB)."""
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    disp = 15 + 25 * ys / height
    for _ in range(int(rng.integers(15, 25))):
        cx, cy, rx, ry = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 250), rng.uniform(20, 180)
        inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1
        slope_x, slope_y = rng.uniform(-0.08, 0.08, 2)
        disp = np.where(inside, rng.uniform(30, 250) + slope_x * (xs - cx) + slope_y * (ys - cy), disp)
    return disp.astype(np.float32)


def encode_fsd_like(index: int) -> tuple[str, dict[str, bytes]]:
    rng = np.random.default_rng(index)
    left = _photo_like(rng, FSD_SIZE)
    right = np.roll(left, -int(rng.integers(5, 60)), axis=1)

    def jpeg(image: np.ndarray) -> bytes:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1].tobytes()

    members = {"left.jpg": jpeg(left), "right.jpg": jpeg(right),
               "disp.fsd.png": encode_fsd_png(_fsd_like_disparity(rng, FSD_SIZE)),
               "meta.json": json.dumps({"source": "bench", "path": f"fsd_like_{index}"}).encode()}
    return f"fsd_like_{index:05d}", members


def plain_loader(members: dict[str, bytes], rng: np.random.Generator, cfg: AugmentConfig) -> dict[str, np.ndarray]:
    """The straightforward cv2 loader the bench compares against: whole images decoded and jittered in float32,
    resized by the drawn zoom, then cropped."""
    def image(name: str) -> np.ndarray:
        bgr = cv2.imdecode(np.frombuffer(members[name], np.uint8), cv2.IMREAD_COLOR)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32)

    left, right = image("left.jpg"), image("right.jpg")
    packed = cv2.imdecode(np.frombuffer(members["disp.fsd.png"], np.uint8), cv2.IMREAD_UNCHANGED).astype(np.float32)
    disp = (packed[..., 2] * 255 * 255 + packed[..., 1] * 255 + packed[..., 0]) / 1000
    brightness = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    contrast, saturation = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast), rng.uniform(*cfg.saturation)
    for view in (left, right):
        view *= brightness
        gray = view @ np.array([0.299, 0.587, 0.114], np.float32)
        view[:] = contrast * view + (1 - contrast) * gray.mean()
        view[:] = saturation * view + (1 - saturation) * gray[..., None]
        np.clip(view, 0, 255, out=view)
    scale = 2 ** rng.uniform(*cfg.scale)
    scale_x, scale_y = scale * 2 ** rng.uniform(-cfg.max_stretch, cfg.max_stretch), scale
    left, right = (cv2.resize(v, None, fx=scale_x, fy=scale_y) for v in (left, right))
    disp = cv2.resize(disp, None, fx=scale_x, fy=scale_y) * scale_x
    (crop_h, crop_w), (height, width) = cfg.crop, disp.shape
    y0, x0 = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    window = (slice(y0, y0 + crop_h), slice(x0, x0 + crop_w))
    disp = disp[window]
    return {"left": left[window], "right": right[window], "disp": disp, "valid": (disp > 0) & (disp < MAX_DISP)}


def per_core(shard: Path, augment_cfg: AugmentConfig, repeats: int) -> dict[str, dict[str, float]]:
    """One process, one OpenCV thread: ours (read, decode, augment) and the plain loader, sample by sample in the
    same loop. Times are the process's CPU time, so that the figure is the cost on one core even on a machine that
    other jobs share (wall time there counts their share too)."""
    cv2.setNumThreads(1)
    augment = Augmentor(augment_cfg, MAX_DISP)
    index = index_tar(str(shard))
    rng = np.random.default_rng(0)
    ours = {"read": 0.0, "decode": 0.0, "augment": 0.0}
    plain = {"read": 0.0, "decode + augment": 0.0}
    count = 0
    with open(shard, "rb") as handle:
        for _ in tqdm(range(repeats), desc="per core", file=sys.stderr):
            for entry in index.samples:
                start = time.process_time()
                members = read_indexed(handle, index, entry)
                read_done = time.process_time()
                sample = decode_checked(members, entry.key)
                decoded = time.process_time()
                augment(sample, rng)
                augmented = time.process_time()
                plain_loader(members, rng, augment_cfg)
                ours["read"] += read_done - start
                ours["decode"] += decoded - read_done
                ours["augment"] += augmented - decoded
                plain["read"] += read_done - start
                plain["decode + augment"] += time.process_time() - augmented
                count += 1

    def summary(stages: dict[str, float]) -> dict[str, float]:
        total = sum(stages.values())
        return {**{f"{stage}_ms": round(1000 * t / count, 1) for stage, t in stages.items()},
                "total_ms": round(1000 * total / count, 1), "samples_per_s": round(count / total, 1)}

    return {"samples": count, "ours": summary(ours), "plain_cv2": summary(plain)}


def loader_wait(shard_dir: Path, augment_cfg: AugmentConfig, workers: int, batch_size: int, batches: int,
                step_s: float) -> dict[str, float]:
    cfg = DataConfig(train=[DatasetSpec("fsd_like", str(shard_dir))], batch_size=batch_size, num_workers=workers,
                     lane_blocks=max(workers, 1))  # every worker busy, whatever the batch size
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


def table(report: dict) -> str:
    sample, core = report["sample"], report["per_core"]
    height, width = sample["size"]
    lines = [f"data loading, one core (CPU time): FSD-like {width}x{height} samples (JPEG pair "
             f"{sample['jpeg_kb']} KB each, packed PNG disparity {sample['disparity_kb']} KB), augmented to {sample['crop'][0]}x"
             f"{sample['crop'][1]}, {core['samples']} samples", "",
             f"{'loader':<10} {'stage':<17} {'ms/sample':>10} {'samples/s':>10}"]
    for name in ("ours", "plain_cv2"):
        stages = {k[:-3]: v for k, v in core[name].items() if k.endswith("_ms") and k != "total_ms"}
        for index, (stage, ms) in enumerate(stages.items()):
            lines.append(f"{name if index == 0 else '':<10} {stage:<17} {ms:>10.1f}")
        lines.append(f"{'':<10} {'total':<17} {core[name]['total_ms']:>10.1f} {core[name]['samples_per_s']:>10.1f}")
    lines.append(f"{'ours / plain':<28} {'':>10} {report['speedup_vs_plain']:>9.2f}x")
    if not report["loader"]:
        return "\n".join(lines)
    lines += ["", f"DataLoader, batch {report['batch_size']}, simulated step {report['step_ms']:g} ms (wall time):",
              f"{'workers':>8} {'first batch s':>14} {'wait ms (median)':>17} {'wait ms (mean)':>15} "
              f"{'samples/s':>10}"]
    for row in report["loader"]:
        lines.append(f"{row['workers']:>8} {row['first_batch_s']:>14.2f} {row['wait_ms_median']:>17.1f} "
                     f"{row['wait_ms_mean']:>15.1f} {row['samples_per_s']:>10.1f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=12, help="distinct FSD-like samples in the temp shard")
    parser.add_argument("--repeats", type=int, default=3, help="passes over them for the per-core figures")
    parser.add_argument("--workers", default="1,2", help="DataLoader worker counts to time, comma separated "
                                                         "(empty: skip)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=10, help="batches timed per worker count")
    parser.add_argument("--step-ms", type=float, default=0.0, help="simulated training step between batches")
    parser.add_argument("--crop", type=int, nargs=2, default=[320, 736], metavar=("H", "W"))
    parser.add_argument("--out", help="also write the figures as JSON here")


def run(args: argparse.Namespace) -> int:
    augment_cfg = AugmentConfig(crop=list(args.crop))
    augment_cfg.validate()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        shard_dir = Path(tmp) / "fsd_like"
        print(f"writing {args.samples} FSD-like samples...", file=sys.stderr)
        manifest = write_shards(list(range(args.samples)), encode_fsd_like, shard_dir, "fsd_like", 1e12, 0,
                                size_of=lambda _: 1)
        shard = shard_dir / manifest["shards"][0]["name"]
        index = index_tar(str(shard))
        sizes = {ext: statistics.fmean(size for e in index.samples for x, (_, size) in e.members.items() if x == ext)
                 for ext in ("left.jpg", "disp.fsd.png")}
        per = per_core(shard, augment_cfg, args.repeats)
        report = {
            "sample": {"size": list(FSD_SIZE), "crop": list(args.crop), "jpeg_kb": round(sizes["left.jpg"] / 1e3),
                       "disparity_kb": round(sizes["disp.fsd.png"] / 1e3)},
            "per_core": per,
            "speedup_vs_plain": round(per["ours"]["samples_per_s"] / per["plain_cv2"]["samples_per_s"], 2),
            "loader": [loader_wait(shard_dir, augment_cfg, int(w), args.batch_size, args.batches, args.step_ms / 1000)
                       for w in args.workers.split(",") if w.strip()],
            "batch_size": args.batch_size,
            "step_ms": args.step_ms,
        }
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0
