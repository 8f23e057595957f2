"""`python -m stereo demo-data`: procedurally generated stereo scenes with exact disparity, as shards.

A scene is a stack of textured layers: a slanted background plane and a few rectangles and ellipses in front of
it, each with a planar disparity d(x, y) = a + b*x + c*y (left-view coordinates). Textures are functions of the
layer's own left-view coordinates (multi-octave value noise, evaluated in float), so each view is rendered
exactly by mapping its pixels back onto the layers and keeping the nearest (largest-disparity) hit. Hence
left(x, y) = right(x - d(x, y), y) holds wherever the point is visible in both views, occlusions are real, and
the left border where x - d < 0 is marked invalid (inf in the PFM). The right-view disparity is stored too.

The validation split adds the real Middlebury 2014 motorcycle pair bundled with scikit-image (no download).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stereo.data.codecs import encode_pfm, encode_png
from stereo.data.shards import write_shards

SCENE_SIZE = (160, 320)  # H, W
MAX_DISP_RANGE = (16.0, 48.0)  # each scene's largest disparity is drawn from this range
OCTAVES = (3.0, 9.0, 27.0)  # value-noise cell sizes in pixels: fine texture makes matching learnable
VAL_SEED_OFFSET = 1_000_000  # validation scenes never share a seed with training scenes
MOTORCYCLE = "motorcycle"


@dataclass(frozen=True)
class Layer:
    plane: tuple[float, float, float]  # disparity a + b*x + c*y in left-view pixels
    shape: str  # "all", "rect" or "ellipse"
    box: tuple[float, float, float, float]  # centre x, centre y, half width, half height (left view)
    noise: tuple[np.ndarray, ...]  # one random (gh, gw, 3) grid per octave
    colour: np.ndarray  # base RGB


def _grid(rng: np.random.Generator, cell: float, size: tuple[int, int], extra_width: float) -> np.ndarray:
    height, width = size
    return rng.uniform(-1, 1, (int(height / cell) + 3, int((width + extra_width) / cell) + 3, 3)).astype(np.float32)


def _bilinear(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample grid at continuous (u, v) (grid units), exact float bilinear interpolation, edges clamped."""
    rows, cols = grid.shape[:2]
    u = np.clip(u, 0, cols - 1.001)
    v = np.clip(v, 0, rows - 1.001)
    u0, v0 = u.astype(np.int64), v.astype(np.int64)
    fu, fv = (u - u0)[:, None], (v - v0)[:, None]
    flat = grid.reshape(-1, 3)
    corner = v0 * cols + u0
    top = flat[corner] * (1 - fu) + flat[corner + 1] * fu
    bottom = flat[corner + cols] * (1 - fu) + flat[corner + cols + 1] * fu
    return top * (1 - fv) + bottom * fv


def random_scene(seed: int, size: tuple[int, int] = SCENE_SIZE) -> list[Layer]:
    rng = np.random.default_rng(seed)
    height, width = size
    max_disp = rng.uniform(*MAX_DISP_RANGE)
    margin = max_disp + 2  # textures must also cover what only the right view sees

    def layer(plane, shape, box) -> Layer:
        noise = tuple(_grid(rng, cell, size, margin) for cell in OCTAVES)
        return Layer(plane, shape, box, noise, rng.uniform(40, 215, 3).astype(np.float32))

    base = rng.uniform(1.0, 0.3 * max_disp)
    slope_x, slope_y = rng.uniform(-0.3, 0.3) * base / width, rng.uniform(0, 0.6) * base / height
    layers = [layer((base, slope_x, slope_y), "all", (0, 0, 0, 0))]
    for _ in range(int(rng.integers(3, 7))):
        near = rng.uniform(base + 2, max_disp)
        plane = (near, rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02))
        box = (rng.uniform(0, width), rng.uniform(0, height), rng.uniform(12, width / 4), rng.uniform(10, height / 3))
        layers.append(layer(plane, str(rng.choice(["rect", "ellipse"])), box))
    return layers


def _layer_hits(layer: Layer, xs: np.ndarray, ys: np.ndarray, view: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For pixels (xs, ys) of a view: the left-view x of the layer point seen there, its disparity, coverage."""
    a, b, c = layer.plane
    if view == "left":
        x_left = xs
    else:  # right pixel xr sees the point whose left x satisfies x - d(x, y) = xr
        x_left = (xs + a + c * ys) / (1.0 - b)
    disp = a + b * x_left + c * ys
    cx, cy, hw, hh = layer.box
    if layer.shape == "all":
        covered = np.ones(xs.shape, bool)
    elif layer.shape == "rect":
        covered = (np.abs(x_left - cx) <= hw) & (np.abs(ys - cy) <= hh)
    else:
        covered = ((x_left - cx) / hw) ** 2 + ((ys - cy) / hh) ** 2 <= 1.0
    return x_left, disp, covered


def _texture(layer: Layer, x_left: np.ndarray, ys: np.ndarray) -> np.ndarray:
    colour = np.broadcast_to(layer.colour, x_left.shape + (3,)).copy()
    for grid, cell, amplitude in zip(layer.noise, OCTAVES, (60.0, 45.0, 30.0)):
        colour += amplitude * _bilinear(grid, x_left / cell + 1, ys / cell + 1)
    return colour


def render(layers: list[Layer], size: tuple[int, int] = SCENE_SIZE) -> dict[str, np.ndarray]:
    """Both views (uint8 RGB) and both disparities (float32, inf where the point leaves the other view)."""
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    out = {}
    for view in ("left", "right"):
        disp = np.full((height, width), -np.inf)
        winner = np.zeros((height, width), np.int64)
        hits = [_layer_hits(layer, xs, ys, view) for layer in layers]
        for index, (_, layer_disp, covered) in enumerate(hits):
            nearer = covered & (layer_disp > disp)
            disp[nearer], winner[nearer] = layer_disp[nearer], index
        image = np.zeros((height, width, 3), np.float64)
        for index, (layer, (x_left, _, _)) in enumerate(zip(layers, hits)):
            seen = winner == index
            image[seen] = _texture(layer, x_left[seen], ys[seen])
        other_x = xs - disp if view == "left" else xs + disp
        disp = np.where((other_x >= 0) & (other_x <= width - 1), disp, np.inf)
        out[view] = np.clip(np.round(image), 0, 255).astype(np.uint8)
        out[f"disp_{view}"] = disp.astype(np.float32)
    return out


def encode_item(item: tuple[str, int]) -> tuple[str, dict[str, bytes]]:
    """A shard writer `encode`: ("scene", seed) or ("motorcycle", 0) -> (key, members)."""
    kind, seed = item
    if kind == MOTORCYCLE:
        from skimage.data import stereo_motorcycle

        left, right, disp = stereo_motorcycle()
        members = {"left.png": encode_png(left), "right.png": encode_png(right), "disp.pfm": encode_pfm(disp),
                   "meta.json": json.dumps({"source": "middlebury2014-skimage", "path": "motorcycle"}).encode()}
        return MOTORCYCLE, members
    views = render(random_scene(seed))
    members = {
        "left.png": encode_png(views["left"]),
        "right.png": encode_png(views["right"]),
        "disp.pfm": encode_pfm(views["disp_left"]),
        "disp_right.pfm": encode_pfm(views["disp_right"]),
        "meta.json": json.dumps({"source": "demo", "path": f"scene_{seed:07d}", "seed": seed}).encode(),
    }
    return f"scene_{seed:07d}", members


def _approx_bytes(item: tuple[str, int]) -> int:
    pixels = SCENE_SIZE[0] * SCENE_SIZE[1]
    return 2_000_000 if item[0] == MOTORCYCLE else 2 * 3 * pixels + 2 * 4 * pixels  # two PNGs, two PFMs


def write_demo(out: Path, train: int, val: int, seed: int, workers: int, shard_bytes: int) -> dict[str, dict]:
    splits = {
        "train": [("scene", seed + i) for i in range(train)],
        "val": [("scene", seed + VAL_SEED_OFFSET + i) for i in range(val)] + [(MOTORCYCLE, 0)],
    }
    return {split: write_shards(items, encode_item, out / split, f"demo_{split}", shard_bytes, workers,
                                size_of=_approx_bytes)
            for split, items in splits.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="shards/demo", help="output directory (train/ and val/ inside)")
    parser.add_argument("--train", type=int, default=200, help="training scenes")
    parser.add_argument("--val", type=int, default=8, help="validation scenes (plus the motorcycle pair)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="encoding processes (0: this process)")
    parser.add_argument("--shard-bytes", type=int, default=8_000_000, help="target shard size")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    manifests = write_demo(Path(args.out), args.train, args.val, args.seed, args.workers, args.shard_bytes)
    summary = {split: {"samples": m["num_samples"], "shards": len(m["shards"])} for split, m in manifests.items()}
    print(json.dumps({"out": args.out, **summary, "seconds": round(time.perf_counter() - start, 1)}))
    return 0 if all(m["complete"] for m in manifests.values()) else 1
