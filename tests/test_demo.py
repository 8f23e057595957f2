"""Demo data: exact procedural scenes, deterministic shards, and a lossless round trip through the loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from skimage.data import stereo_motorcycle

from stereo.cli import main
from stereo.config.schema import DataConfig, DatasetSpec
from stereo.data.demo import VAL_SEED_OFFSET, random_scene, render
from stereo.data.loader import iter_val_samples


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory) -> list[Path]:
    """The same small demo set written twice through the CLI."""
    outs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(name) / "demo"
        assert main(["demo-data", "--out", str(out), "--train", "5", "--val", "1", "--seed", "3", "--workers", "0",
                     "--shard-bytes", "600000"]) == 0
        outs.append(out)
    return outs


def test_scenes_hold_the_stereo_invariant_exactly_where_visible():
    for seed in range(3):
        views = render(random_scene(seed))
        left, right = views["left"].astype(np.float64), views["right"].astype(np.float64)
        disp, disp_right = views["disp_left"], views["disp_right"]
        height, width = disp.shape
        ys, xs = np.mgrid[0:height, 0:width]
        x_right = xs - disp
        np.testing.assert_array_equal(np.isfinite(disp), x_right >= 0)  # invalid exactly off the right view
        valid = np.isfinite(disp)
        x0 = np.clip(np.floor(np.where(valid, x_right, 0)).astype(np.int64), 0, width - 2)
        # visible in both views: the right view's own disparity agrees at the matching pixel
        visible = valid & (np.abs(disp_right[ys, x0] - np.where(valid, disp, 0)) < 0.5)
        frac = (np.where(valid, x_right, 0) - x0)[..., None]
        sampled = right[ys, x0] * (1 - frac) + right[ys, x0 + 1] * frac
        error = np.abs(sampled - left).mean(axis=-1)[visible]
        assert visible.mean() > 0.7
        assert np.median(error) < 1.5 and np.percentile(error, 90) < 8
        assert 10 < disp[valid].max() < 50 and disp[valid].min() > 0
    spans = [np.nanmax(np.where(np.isfinite(d := render(random_scene(s))["disp_left"]), d, np.nan))
             for s in range(6)]
    assert np.ptp(spans) > 5  # the largest disparity varies from scene to scene


def test_demo_data_is_deterministic(demo_dirs: list[Path]):
    manifests = [json.loads((out / split / "manifest.json").read_text()) for out in demo_dirs
                 for split in ("train", "val")]
    train_a, val_a, train_b, val_b = manifests
    assert train_a["num_samples"] == 5 and val_a["num_samples"] == 2 and len(train_a["shards"]) > 1
    assert [s["sha256"] for s in train_a["shards"]] == [s["sha256"] for s in train_b["shards"]]
    assert [s["sha256"] for s in val_a["shards"]] == [s["sha256"] for s in val_b["shards"]]


def test_shards_round_trip_to_the_rendered_pixels(demo_dirs: list[Path]):
    out = demo_dirs[0]
    cfg = DataConfig(val=[DatasetSpec("train", str(out / "train")), DatasetSpec("val", str(out / "val"))])
    samples = list(iter_val_samples(cfg))
    assert [s["key"] for s in samples] == [f"scene_{3 + i:07d}" for i in range(5)] + [
        f"scene_{3 + VAL_SEED_OFFSET:07d}", "motorcycle"]
    for sample in samples[:-1]:
        views = render(random_scene(sample["meta"]["seed"]))
        np.testing.assert_array_equal(sample["left"], views["left"])
        np.testing.assert_array_equal(sample["right"], views["right"])
        np.testing.assert_array_equal(sample["valid"], np.isfinite(views["disp_left"]))
        np.testing.assert_array_equal(sample["disp"][sample["valid"]], views["disp_left"][sample["valid"]])
        assert sample["disp_right"] is not None
    left, right, disp = stereo_motorcycle()
    moto = samples[-1]
    np.testing.assert_array_equal(moto["left"], left)
    np.testing.assert_array_equal(moto["right"], right)
    np.testing.assert_array_equal(moto["valid"], np.isfinite(disp))
    np.testing.assert_array_equal(moto["disp"][moto["valid"]], disp[np.isfinite(disp)])


def test_train_loader_without_augmentation_gives_the_rendered_scenes(demo_dirs: list[Path]):
    import torch

    from stereo.data.loader import build_train_loader

    cfg = DataConfig(train=[DatasetSpec("demo", str(demo_dirs[0] / "train"))], batch_size=1, num_workers=0)
    loader = build_train_loader(cfg, None, max_disp=30, rank=0, world_size=1)
    rendered = {seed: render(random_scene(seed)) for seed in range(3, 8)}
    matched = []
    for batch, _ in zip(loader, range(5)):  # one epoch: each scene once
        left = batch["left"][0].permute(1, 2, 0).numpy()
        seed = next(s for s, views in rendered.items() if np.array_equal(left, views["left"]))
        views = rendered[seed]
        valid = np.isfinite(views["disp_left"]) & (views["disp_left"] < 30)  # max_disp masks the rest
        assert torch.equal(batch["valid"][0, 0], torch.from_numpy(valid))
        np.testing.assert_array_equal(batch["disp"][0, 0].numpy()[valid], views["disp_left"][valid])
        np.testing.assert_array_equal(batch["right"][0].permute(1, 2, 0).numpy(), views["right"])
        matched.append(seed)
    assert sorted(matched) == list(range(3, 8))
