"""Training augmentation after RAFT-Stereo's augmentor (which the FoundationStereo paper points to).

All geometry (view-swap flip, vertical flip, scale + stretch, crop, right-view y-jitter) is folded into one affine
map per output and applied with a single `cv2.warpAffine` that computes only the crop's pixels, so the cost does
not grow with the zoom. Disparity is multiplied by the horizontal factor. Invalid disparity never leaks into valid
pixels: the warp interpolates disparity * valid and valid separately and divides, keeping pixels where most of the
interpolation weight was valid. Images smaller than the crop (or not zoomed enough) are *upscaled* to the smallest
size that fits, never padded. Colour (brightness, contrast, saturation, hue in a random order, then gamma) and the
occlusion eraser work on the crop, which is cheaper and equivalent up to the image statistics they use.

The stereo invariant left(x, y) = right(x - d(x, y), y) survives every geometric op (tests/test_augment.py checks
each one on a synthetic scene); only the y-jitter breaks it on purpose, by up to `yjitter` rows.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from stereo.config.schema import AugmentConfig

Sample = dict[str, Any]
CROP_ATTEMPTS = 10  # crops tried before the sample is given up as having no valid pixel
VALID_WEIGHT = 0.5  # a warped pixel is valid when at least this share of its interpolation weight was valid
ERASER_SIZE = (50, 100)  # box side range in pixels, as RAFT-Stereo
GRAY = np.array([0.299, 0.587, 0.114])


def _affine(scale: float, offset: float, mirror: bool, size: int) -> tuple[float, float]:
    """Output coordinate u -> source coordinate a*u + b for a zoom `scale`, crop `offset` and optional mirror
    (pixel centres aligned, as cv2.resize does)."""
    a, b = 1.0 / scale, (offset + 0.5) / scale - 0.5
    return (-a, size - 1 - b) if mirror else (a, b)


def _warp(image: np.ndarray, x: tuple[float, float], y: tuple[float, float], shape: tuple[int, int],
          interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    matrix = np.array([[x[0], 0.0, x[1]], [0.0, y[0], y[1]]], dtype=np.float64)
    return cv2.warpAffine(image, matrix, (shape[1], shape[0]), flags=interpolation | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _span(axis: tuple[float, float], count: int, size: int) -> tuple[int, int]:
    """The source index range [lo, hi) that outputs 0..count-1 of the map u -> a*u + b read with bilinear
    interpolation (with a pixel to spare on each side)."""
    ends = (axis[1], axis[0] * (count - 1) + axis[1])
    lo, hi = max(math.floor(min(ends)) - 1, 0), min(math.floor(max(ends)) + 3, size)
    return (lo, hi) if lo < hi else (0, size)


def window(x: tuple[float, float], y: tuple[float, float], shape: tuple[int, int], size: tuple[int, int],
           ) -> tuple[slice, slice, tuple[float, float], tuple[float, float]]:
    """The part of a (size) source that a warp to `shape` reads, and the maps relative to it: work on the whole
    image (float conversion, masks) is done on this window only. The warp is exact: the window only moves the
    map by whole pixels, and its edges are never sampled except at the image's own borders."""
    (y0, y1), (x0, x1) = _span(y, shape[0], size[0]), _span(x, shape[1], size[1])
    return slice(y0, y1), slice(x0, x1), (x[0], x[1] - x0), (y[0], y[1] - y0)


def warp_image(image: np.ndarray, x, y, shape) -> np.ndarray:
    """uint8 RGB warp through 4 channels: OpenCV's vectorised warp has 1- and 4-channel paths, and the
    3-channel one is 4-6x slower (measured, docs/data.md); converting only the window costs little."""
    rows, cols, x, y = window(x, y, shape, image.shape[:2])
    rgba = cv2.cvtColor(image[rows, cols], cv2.COLOR_RGB2RGBA)
    return cv2.cvtColor(_warp(rgba, x, y, shape), cv2.COLOR_RGBA2RGB)


def warp_disparity(disp: np.ndarray, valid: np.ndarray, x, y, shape, factor: float) -> tuple[np.ndarray, np.ndarray]:
    rows, cols, x, y = window(x, y, shape, disp.shape)
    disp, valid = disp[rows, cols], valid[rows, cols]
    weight = _warp(valid.astype(np.float32), x, y, shape)
    total = _warp(np.where(valid, disp, np.float32(0)), x, y, shape)
    valid_out = weight >= VALID_WEIGHT
    disp_out = np.where(valid_out, total / np.maximum(weight, 1e-6) * np.float32(factor), np.float32(0))
    return disp_out.astype(np.float32, copy=False), valid_out


class Augmentor:
    """`augmentor(sample, rng)` -> the augmented crop, or None when no crop with a valid pixel was found."""

    def __init__(self, cfg: AugmentConfig, max_disp: float):
        self.cfg, self.max_disp = cfg, max_disp
        self.crop = (int(cfg.crop[0]), int(cfg.crop[1]))

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample | None:
        out = self.geometry(sample, rng)
        if out is None:
            return None
        self.colour(out, rng)
        self.erase(out["right"], rng)
        return out

    # -- geometry -----------------------------------------------------------------------------------------------
    def geometry(self, sample: Sample, rng: np.random.Generator) -> Sample | None:
        cfg, (crop_h, crop_w) = self.cfg, self.crop
        left, right, disp, valid = sample["left"], sample["right"], sample["disp"], sample["valid"]
        swap = sample.get("disp_right") is not None and rng.random() < cfg.hflip_prob
        if swap:  # mirrored views swap roles; the right view's disparity becomes the left one
            left, right = right, left
            disp = sample["disp_right"]
            valid = np.isfinite(disp) & (disp > 0)
        vflip = rng.random() < cfg.vflip_prob
        height, width = disp.shape
        scale_x = scale_y = 1.0
        if rng.random() < cfg.spatial_prob:
            scale_x = scale_y = 2.0 ** rng.uniform(*cfg.scale)
            if rng.random() < cfg.stretch_prob:
                scale_x *= 2.0 ** rng.uniform(-cfg.max_stretch, cfg.max_stretch)
                scale_y *= 2.0 ** rng.uniform(-cfg.max_stretch, cfg.max_stretch)
        # too small for the crop (plus the jitter margin): upscale to the smallest size that fits
        scale_x = max(scale_x, (crop_w + 1) / width)
        scale_y = max(scale_y, (crop_h + 2 * cfg.yjitter + 1) / height)
        max_x = max(int(math.floor(width * scale_x)) - crop_w, 0)
        max_y = max(int(math.floor(height * scale_y)) - crop_h - cfg.yjitter, cfg.yjitter)
        for _ in range(CROP_ATTEMPTS):
            x0 = int(rng.integers(0, max_x + 1))
            y0 = int(rng.integers(cfg.yjitter, max_y + 1))
            ax = _affine(scale_x, x0, swap, width)
            ay = _affine(scale_y, y0, vflip, height)
            disp_out, valid_out = warp_disparity(disp, valid, ax, ay, self.crop, scale_x)
            valid_out &= disp_out < self.max_disp
            if valid_out.any():
                break
        else:
            return None
        y_right = y0 + int(rng.integers(-cfg.yjitter, cfg.yjitter + 1)) if cfg.yjitter else y0
        out = dict(sample)
        out.update(
            left=warp_image(left, ax, ay, self.crop),
            right=warp_image(right, ax, _affine(scale_y, y_right, vflip, height), self.crop),
            disp=np.where(valid_out, disp_out, np.float32(0)),
            valid=valid_out,
            disp_right=None,
            nocc=None,
        )
        return out

    # -- photometric --------------------------------------------------------------------------------------------
    def colour(self, sample: Sample, rng: np.random.Generator) -> None:
        left, right = sample["left"], sample["right"]
        if rng.random() < self.cfg.asymmetric_color_prob:
            sample["left"] = self._jitter(left, _mean_rgb(left), rng)
            sample["right"] = self._jitter(right, _mean_rgb(right), rng)
        else:  # one transform for the pair, statistics over both views
            transform = self._transform((_mean_rgb(left) + _mean_rgb(right)) / 2, rng)
            sample["left"], sample["right"] = (_apply(image, *transform) for image in (left, right))

    def _jitter(self, image: np.ndarray, mean_rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _apply(image, *self._transform(mean_rgb, rng))

    def _transform(self, mean_rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """Brightness, contrast, saturation and hue (in a random order, as torchvision's ColorJitter) are all
        affine in RGB, so they compose into one 3x4 matrix; the contrast's grey mean follows through the
        composition. Clipping happens once at the end (torchvision clips after each op)."""
        cfg = self.cfg
        brightness = rng.uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness)
        contrast = rng.uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)
        saturation = rng.uniform(*cfg.saturation)
        hue = rng.uniform(-cfg.hue, cfg.hue)
        gamma = rng.uniform(*cfg.gamma)
        matrix, offset, mean = np.eye(3), np.zeros(3), mean_rgb.astype(np.float64)
        for op in rng.permutation(4):
            if op == 0:
                step, shift = brightness * np.eye(3), np.zeros(3)
            elif op == 1:
                step, shift = contrast * np.eye(3), np.full(3, (1 - contrast) * float(GRAY @ mean))
            elif op == 2:
                step, shift = saturation * np.eye(3) + (1 - saturation) * np.outer(np.ones(3), GRAY), np.zeros(3)
            else:
                step, shift = _hue_rotation(hue), np.zeros(3)
            matrix, offset, mean = step @ matrix, step @ offset + shift, step @ mean + shift
        return np.hstack([matrix, offset[:, None]]).astype(np.float32), gamma

    def erase(self, right: np.ndarray, rng: np.random.Generator) -> None:
        """Occlusion: 1-2 boxes on the right view filled with its mean colour (left disparity stays valid)."""
        if rng.random() >= self.cfg.eraser_prob:
            return
        height, width = right.shape[:2]
        mean = _mean_rgb(right)
        for _ in range(int(rng.integers(1, 3))):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            dx, dy = (int(v) for v in rng.integers(*ERASER_SIZE, size=2))
            right[y0:y0 + dy, x0:x0 + dx] = mean


_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_rotation(turns: float) -> np.ndarray:
    """Hue shift by a fraction of a turn as a rotation of the chroma plane in YIQ space (linear in RGB)."""
    angle = -2 * np.pi * turns  # YIQ's chroma angle runs opposite to HSV hue
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    return np.linalg.inv(_YIQ) @ rotation @ _YIQ


def _mean_rgb(image: np.ndarray) -> np.ndarray:
    return np.array(cv2.mean(image)[:3])


def _apply(image: np.ndarray, transform: np.ndarray, gamma: float) -> np.ndarray:
    out = cv2.transform(image.astype(np.float32, copy=False), transform)
    np.clip(out, 0, 255, out=out)
    if gamma != 1.0:
        out = 255.0 * (out / 255.0) ** gamma
    return out
