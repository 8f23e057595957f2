"""The evaluation protocols: which data, which resolution, which pixels and which number each benchmark reports.

Every benchmark runs on the public training split (the test splits' ground truth is withheld), either from the
raw directory in its official layout (read through `stereo.data.sources`) or from shards written from it. The
numbers to compare against are FoundationStereo's zero-shot results (paper Tab. 2 and 3): Middlebury BP-2 1.1,
ETH3D BP-1 0.5, KITTI-12 D1 2.3, KITTI-15 D1 2.8, Scene Flow EPE 0.34.

Aggregation follows the evaluation code of the RAFT-Stereo family that the paper compares within: KITTI pools
pixels over the whole set (as the KITTI devkit does), the others average per-image values with equal weights
(MiddEval3's own web table weights a few scenes by one half; we do not). Both aggregations are always in
results.json. No disparity cap is applied to them (see stereo.eval.metrics for what that changes on Scene Flow).

`demo` is not a benchmark of the paper: it scores a run on the demo validation shards exactly as the trainer's
validation does, so that `make eval CKPT=runs/<tiny run> BENCH=demo` reproduces the EPE the training printed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from stereo.config.schema import DataConfig, DatasetSpec
from stereo.data.shards import read_manifest
from stereo.data.sources import SourceError, get_source, load_raw

Sample = dict[str, Any]


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    source: str | None  # key of stereo.data.sources.SOURCES for raw directories; None: shards only
    protocol: str  # which split, mask, resolution and aggregation; shown in results and docs
    headline: tuple[str, ...]  # summary keys reported; the first is the paper's number
    paper: float | None  # FoundationStereo zero-shot value of headline[0]; None: not a published benchmark
    source_options: dict[str, str] = field(default_factory=dict)
    default_data: str | None = None  # where the data is when --data is not given
    max_disp_from_model: bool = False  # drop gt >= the model's max_disp, as the trainer's validation does
    scale: float = 1.0  # images and ground truth are resized by this before inference
    nocc_from_right_disparity: bool = False  # derive the non-occluded mask by a left-right check of the gt

    def prepare(self, sample: Sample) -> Sample:
        """Apply the protocol to a decoded sample: occlusion mask from the right-view gt, then resolution."""
        if self.nocc_from_right_disparity and sample.get("nocc") is None and sample.get("disp_right") is not None:
            sample["nocc"] = sample["valid"] & left_right_consistent(sample["disp"], sample["disp_right"])
        return rescale(sample, self.scale) if self.scale != 1.0 else sample


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark(
        name="kitti12", title="KITTI 2012 training", source="kitti12",
        protocol="194 training pairs (colored_0/1), full resolution. D1-all over disp_occ (every pixel with LiDAR "
                 "ground truth), D1-noc over disp_noc; D1 = error > 3 px and > 5 % of the gt. Pooled over all pixels.",
        headline=("d1/pooled", "d1_noc/pooled", "epe/pooled", "bp_3/pooled"), paper=2.3),
    Benchmark(
        name="kitti15", title="KITTI 2015 training", source="kitti15",
        protocol="200 training pairs (image_2/3), full resolution. D1-all over disp_occ_0, D1-noc over disp_noc_0; "
                 "D1 = error > 3 px and > 5 % of the gt. Pooled over all pixels.",
        headline=("d1/pooled", "d1_noc/pooled", "epe/pooled", "bp_3/pooled"), paper=2.8),
    Benchmark(
        name="middeval3", title="Middlebury (MiddEval3 training, half resolution H)", source="middeval3",
        source_options={"resolution": "H"},
        protocol="The 15 MiddEval3 trainingH pairs as distributed (half resolution). BP-2 over non-occluded pixels "
                 "(mask0nocc.png == 255 and finite disp0GT.pfm); also BP-1 and EPE. Mean over images.",
        headline=("bp_2_noc/mean_image", "bp_1_noc/mean_image", "epe_noc/mean_image", "bp_2/mean_image"),
        paper=1.1),
    Benchmark(
        name="middlebury2014", title="Middlebury 2014 (full scenes at half resolution)", source="middlebury2014",
        scale=0.5, nocc_from_right_disparity=True,
        protocol="The Middlebury 2014 scenes (im0/im1, disp0.pfm), images area-downsampled by 2 and disparity "
                 "nearest-downsampled and halved (MiddEval3's H resolution). Non-occluded = finite gt that passes "
                 "a 1 px left-right check against disp1.pfm. BP-2 non-occluded, also BP-1 and EPE. Mean over images.",
        headline=("bp_2_noc/mean_image", "bp_1_noc/mean_image", "epe_noc/mean_image", "bp_2/mean_image"),
        paper=1.1),
    Benchmark(
        name="eth3d", title="ETH3D two-view training", source="eth3d",
        protocol="The 27 low-res two-view training pairs, full resolution (gray images as RGB). BP-1 over "
                 "non-occluded pixels (mask0nocc.png == 255 and finite disp0GT.pfm); also BP-2 and EPE. Mean over "
                 "images.",
        headline=("bp_1_noc/mean_image", "bp_2_noc/mean_image", "epe_noc/mean_image", "bp_1/mean_image"),
        paper=0.5),
    Benchmark(
        name="sceneflow", title="Scene Flow test (FlyingThings3D TEST, final pass)", source="sceneflow",
        source_options={"split": "test", "passes": "final"},
        protocol="FlyingThings3D TEST, final pass, full resolution 960x540. EPE over every pixel with finite gt > 0 "
                 "(no 192 px cap), mean over images; also BP-1 and D1.",
        headline=("epe/mean_image", "epe/pooled", "bp_1/mean_image", "d1/mean_image"), paper=0.34),
    Benchmark(
        name="demo", title="Demo validation shards (procedural scenes + the Middlebury motorcycle)",
        source=None, default_data="shards/demo/val", max_disp_from_model=True,
        protocol="The validation split `make demo-data` writes: 8 procedural scenes (320x160) and the Middlebury 2014 "
                 "motorcycle pair at scikit-image's size (741x500). As the trainer's validation: finite gt below "
                 "the model's max_disp, pooled over all pixels; no published number to compare with.",
        headline=("epe/pooled", "bp_2/pooled", "d1/pooled"), paper=None),
]}


def left_right_consistent(disp_left: np.ndarray, disp_right: np.ndarray, tolerance: float = 1.0) -> np.ndarray:
    """Pixels of the left view whose gt disparity d lands at x - d in the right view on a right-view disparity
    within `tolerance` px of d (the usual occlusion test; occluded pixels see something nearer instead)."""
    height, width = disp_left.shape
    columns = np.arange(width)[None, :] - np.rint(disp_left).astype(np.int64)
    inside = (columns >= 0) & (columns < width) & (disp_left > 0)
    matched = disp_right[np.arange(height)[:, None], np.clip(columns, 0, width - 1)]
    return inside & (np.abs(matched - disp_left) <= tolerance)


def rescale(sample: Sample, scale: float) -> Sample:
    """Images area-resampled; disparity (times `scale`) and masks nearest-resampled, so no invalid pixel mixes in."""
    height, width = sample["left"].shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))

    def nearest(array: np.ndarray) -> np.ndarray:
        return cv2.resize(array.astype(np.uint8) if array.dtype == bool else array, size,
                          interpolation=cv2.INTER_NEAREST)

    out = dict(sample)
    for view in ("left", "right"):
        out[view] = cv2.resize(sample[view], size, interpolation=cv2.INTER_AREA)
    out["disp"] = nearest(sample["disp"]) * np.float32(scale)
    out["valid"] = nearest(sample["valid"]).astype(bool)
    if sample.get("nocc") is not None:
        out["nocc"] = nearest(sample["nocc"]).astype(bool)
    if sample.get("disp_right") is not None:
        out["disp_right"] = nearest(sample["disp_right"]) * np.float32(scale)
    return out


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def is_shard_location(data: str) -> bool:
    """Shards: a directory with manifest.json, a .tar file, a brace pattern, a list file or a `pipe:` command."""
    path = Path(data)
    return (data.startswith("pipe:") or "{" in data or data.endswith((".tar", ".txt"))
            or (path / "manifest.json").is_file())


class BenchmarkSamples:
    """The prepared samples of one benchmark, lazily decoded; `len()` is known for raw directories."""

    def __init__(self, benchmark: Benchmark, data: str | Path, limit: int | None = None,
                 options: dict[str, str] | None = None):
        self.benchmark, self.data, self.limit = benchmark, str(data), limit
        self.raw = None
        if is_shard_location(self.data) and options:
            raise SourceError(f"{self.data}: source options ({', '.join(options)}) apply to raw directories; shards "
                              "hold whatever was chosen when they were written")
        if not is_shard_location(self.data):
            if benchmark.source is None:
                raise SourceError(f"{self.data}: no shards there (no manifest.json); the {benchmark.name} benchmark "
                                  f"reads shards only" + (" (`make demo-data` writes them)" if benchmark.name == "demo"
                                                          else ""))
            self.raw = get_source(benchmark.source).list_samples(
                self.data, **{**benchmark.source_options, **(options or {})})[:limit]

    def __len__(self) -> int:
        if self.raw is not None:
            return len(self.raw)
        manifest = read_manifest(self.data) if Path(self.data).is_dir() else None
        if manifest is None:  # a pattern, list file or pipe: known only after reading
            raise TypeError(f"{self.data}: the number of samples is unknown without a manifest.json")
        count = manifest["num_samples"]
        return count if self.limit is None else min(count, self.limit)

    def __iter__(self) -> Iterator[Sample]:
        if self.raw is not None:
            samples: Iterator[Sample] = (load_raw(raw) for raw in self.raw)
        else:
            from stereo.data.loader import iter_val_samples  # the shard reader pulls in torch's data stack

            spec = DatasetSpec(name=self.benchmark.name, shards=self.data)
            samples = iter_val_samples(DataConfig(val=[spec], val_samples=self.limit))
        for sample in samples:
            yield self.benchmark.prepare(sample)
