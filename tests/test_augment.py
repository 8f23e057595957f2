"""Augmentation: every geometric op keeps left(x, y) = right(x - d(x, y), y) on an exact synthetic scene."""

from __future__ import annotations

import numpy as np
import pytest

from stereo.config.schema import AugmentConfig
from stereo.data.augment import Augmentor
from stereo.data.demo import random_scene, render

CROP = [96, 192]
# photometric ops and the y-jitter off: the invariant must then hold up to interpolation
STILL = dict(brightness=0.0, contrast=0.0, saturation=[1.0, 1.0], hue=0.0, eraser_prob=0.0, yjitter=0,
             asymmetric_color_prob=0.0)


def scene(seed: int) -> dict:
    views = render(random_scene(seed))
    disp, disp_right = views["disp_left"], views["disp_right"]
    valid = np.isfinite(disp)
    return {"key": f"scene{seed}", "left": views["left"], "right": views["right"], "meta": {}, "nocc": None,
            "disp": np.where(valid, disp, 0).astype(np.float32), "valid": valid,
            "disp_right": np.where(np.isfinite(disp_right), disp_right, 0).astype(np.float32)}


def agreement(sample: dict, offset: float = 0.0) -> float:
    """Share of valid pixels where the right view sampled at x - d matches the left view (occlusions miss)."""
    left, right = sample["left"].astype(np.float64), sample["right"].astype(np.float64)
    disp = sample["disp"] + offset
    height, width = disp.shape
    ys, xs = np.mgrid[0:height, 0:width]
    x_right = xs - disp
    inside = sample["valid"] & (x_right >= 0) & (x_right <= width - 1)
    x0 = np.clip(np.floor(x_right).astype(np.int64), 0, width - 2)
    frac = (x_right - x0)[..., None]
    sampled = right[ys, x0] * (1 - frac) + right[ys, x0 + 1] * frac
    error = np.abs(sampled - left).mean(axis=-1)
    return float((error[inside] < 10).mean())


@pytest.mark.parametrize("name,options", [
    ("crop", dict(spatial_prob=0.0)),
    ("scale", dict(stretch_prob=0.0)),
    ("stretch", dict(stretch_prob=1.0, scale=[0.0, 0.0])),
    ("view-swap flip", dict(spatial_prob=0.0, hflip_prob=1.0)),
    ("vertical flip", dict(spatial_prob=0.0, vflip_prob=1.0)),
    ("everything", dict(hflip_prob=0.5, vflip_prob=0.5)),
])
def test_geometric_ops_keep_the_stereo_invariant(name: str, options: dict):
    augment = Augmentor(AugmentConfig(crop=CROP, **STILL, **options), max_disp=256)
    assert agreement(scene(0)) > 0.9
    for seed in range(3):
        out = augment(scene(seed), np.random.default_rng(seed))
        assert out["left"].shape == (96, 192, 3) and out["disp"].shape == (96, 192)
        assert out["left"].dtype == np.float32 and out["valid"].dtype == bool
        assert not out["disp"][~out["valid"]].any()
        # matching beats a 2-pixel disparity error by far: the disparity follows the images
        assert agreement(out) > 0.8, name
        assert agreement(out, offset=2.0) < agreement(out) - 0.4, name


def test_swap_flip_needs_the_right_disparity():
    sample = scene(1)
    sample["disp_right"] = None
    augment = Augmentor(AugmentConfig(crop=CROP, **STILL, spatial_prob=0.0, hflip_prob=1.0), max_disp=256)
    out = augment(sample, np.random.default_rng(0))
    assert agreement(out) > 0.8


def test_y_jitter_shifts_only_the_right_view_by_at_most_the_setting():
    sample = scene(2)
    augment = Augmentor(AugmentConfig(crop=CROP, **{**STILL, "yjitter": 2}, spatial_prob=0.0), max_disp=256)
    shifts = set()
    for seed in range(12):
        out = augment(sample, np.random.default_rng(seed))
        best = max(range(-3, 4), key=lambda dy: agreement({**out, "right": np.roll(out["right"], dy, axis=0)}))
        shifts.add(best)
    assert shifts <= {-2, -1, 0, 1, 2} and len(shifts) > 1


def test_sparse_disparity_never_mixes_invalid_pixels_in():
    rng = np.random.default_rng(0)
    sample = scene(3)
    valid = rng.random(sample["valid"].shape) < 0.05  # sparse, like LiDAR ground truth
    sample.update(valid=valid, disp=np.where(valid, 10.0, 0.0).astype(np.float32), disp_right=None)
    augment = Augmentor(AugmentConfig(crop=CROP, **STILL), max_disp=256)
    for seed in range(5):
        out = augment(sample, np.random.default_rng(seed))
        values = out["disp"][out["valid"]]
        assert values.size > 0
        # one constant disparity times one horizontal factor: any invalid (0) pixel mixed in would lower some
        assert np.ptp(values) < 1e-3 and 10 * 2 ** -0.41 < values[0] < 10 * 2 ** 0.61


def test_crop_never_yields_a_sample_without_valid_pixels():
    sample = scene(4)
    keep = np.zeros_like(sample["valid"])
    keep[140:150, 300:310] = True  # one small valid corner
    valid = sample["valid"] & keep
    sample.update(valid=valid, disp=np.where(valid, sample["disp"], 0), disp_right=None)
    augment = Augmentor(AugmentConfig(crop=[64, 128], **STILL), max_disp=256)
    outs = [augment(sample, np.random.default_rng(seed)) for seed in range(10)]
    assert all(out is None or out["valid"].any() for out in outs) and any(out is not None for out in outs)
    too_far = Augmentor(AugmentConfig(crop=[64, 128], **STILL), max_disp=1)  # every disparity >= max_disp
    assert too_far(scene(4), np.random.default_rng(0)) is None


def test_small_images_are_upscaled_to_the_crop():
    sample = scene(5)
    augment = Augmentor(AugmentConfig(crop=[192, 352], **STILL, spatial_prob=0.0), max_disp=512)
    out = augment(sample, np.random.default_rng(0))
    assert out["left"].shape == (192, 352, 3)
    assert agreement(out) > 0.8
    # upscaled at least 352/320 horizontally: the disparity grew with it
    assert out["disp"][out["valid"]].max() > sample["disp"].max() * 1.05


def test_colour_is_symmetric_unless_asymmetric_and_eraser_hits_only_the_right_view():
    sample = scene(6)
    sample["right"] = sample["left"].copy()
    sample["disp"][:] = 1.0  # the images no longer form a scene; only photometry is checked here
    colour_only = dict(spatial_prob=0.0, yjitter=0, eraser_prob=0.0)
    symmetric = Augmentor(AugmentConfig(crop=CROP, asymmetric_color_prob=0.0, **colour_only), 256)
    for seed in range(3):
        out = symmetric(sample, np.random.default_rng(seed))
        np.testing.assert_array_equal(out["left"], out["right"])
        assert not np.allclose(out["left"], sample["left"][: CROP[0], : CROP[1]], atol=2)
        assert out["left"].min() >= 0 and out["left"].max() <= 255
    asymmetric = Augmentor(AugmentConfig(crop=CROP, asymmetric_color_prob=1.0, **colour_only), 256)
    out = asymmetric(sample, np.random.default_rng(0))
    assert np.abs(out["left"] - out["right"]).mean() > 1
    eraser = Augmentor(AugmentConfig(crop=CROP, **{**STILL, "eraser_prob": 1.0}, spatial_prob=0.0), 256)
    out = eraser(sample, np.random.default_rng(0))
    changed = np.abs(out["left"] - out["right"]).max(axis=-1) > 0
    rows, cols = np.nonzero(changed)
    assert 50 <= max(np.ptp(rows), np.ptp(cols)) + 1 <= 2 * 100
    assert len(np.unique(out["right"][changed], axis=0)) == 1  # filled with one (mean) colour


def test_same_generator_same_result():
    augment = Augmentor(AugmentConfig(crop=CROP), max_disp=256)
    a = augment(scene(7), np.random.default_rng(11))
    b = augment(scene(7), np.random.default_rng(11))
    c = augment(scene(7), np.random.default_rng(12))
    for key in ("left", "right", "disp", "valid"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["left"], c["left"])


def test_hue_rotation_keeps_greys_and_turns_colours():
    from stereo.data.augment import _hue_rotation

    grey = np.array([100.0, 100.0, 100.0])
    np.testing.assert_allclose(_hue_rotation(0.3) @ grey, grey, atol=1e-6)
    np.testing.assert_allclose(_hue_rotation(0.0), np.eye(3), atol=1e-9)
    turned = _hue_rotation(1 / 3) @ np.array([200.0, 30.0, 30.0])  # a third of a turn: red becomes green-ish
    assert np.argmax(turned) == 1


@pytest.mark.parametrize("mirror", [False, True])
def test_windowed_warps_match_whole_image_warps(mirror: bool):
    """The fast path (warp only the window the crop reads; images through 4 channels) gives the pixels of a plain
    3-channel warp of the whole image, at the borders too (replicated), zoomed in or out. OpenCV computes the
    sample positions in float32, so moving the origin to the window may change the rounding: at most one grey
    level, and validity only where the valid weight is within one rounding step of the 50 % threshold."""
    from stereo.data.augment import _affine, _warp, warp_disparity, warp_image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)
    disp = rng.uniform(1, 50, (90, 150)).astype(np.float32)
    valid = rng.random((90, 150)) < 0.7
    disp[~valid] = 0
    for scale, x0, y0 in ((1.0, 0, 0), (1.0, 150 - 64, 90 - 48), (0.7, 5, 3), (1.9, 100, 60), (1.3, 0, 70)):
        x, y = _affine(scale, x0, mirror, 150), _affine(scale * 0.9, y0, False, 90)
        fast, plain = warp_image(image, x, y, (48, 64)).astype(int), _warp(image, x, y, (48, 64)).astype(int)
        assert np.abs(fast - plain).max() <= 1 and np.abs(fast - plain).mean() < 0.05
        weight = _warp(valid.astype(np.float32), x, y, (48, 64))
        total = _warp(np.where(valid, disp, 0).astype(np.float32), x, y, (48, 64))
        disp_out, valid_out = warp_disparity(disp, valid, x, y, (48, 64), scale)
        expected = weight >= 0.5
        # a sample position moved by one step of OpenCV's 1/32-pixel grid moves a weight by at most 1/32
        assert (np.abs(weight[valid_out != expected] - 0.5) <= 1 / 32).all()
        both = valid_out & expected
        np.testing.assert_allclose(disp_out[both], total[both] / weight[both] * scale, rtol=1e-4)
        assert not disp_out[~valid_out].any()
