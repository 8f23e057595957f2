"""The one definition of the stereo metrics (EPE, BP-x, D1), per image and accumulated over a benchmark.

Which pixels count:
* the evaluated region is `valid & isfinite(gt)`; when no `valid` mask is given, `gt > 0` stands for it (the
  decoded-sample convention: disparity 0 where invalid). inf/NaN ground truth is never evaluated.
* the non-occluded region (`*_noc` keys) is that region `& nocc`; without an `nocc` mask the `_noc` values are None.
* no maximum-disparity cap unless the caller passes `max_disp` (then pixels with gt >= max_disp are dropped).
  Several public evaluators (PSMNet, RAFT-Stereo and IGEV on Scene Flow) silently drop gt >= 192 px; we do not,
  so our Scene Flow EPE includes the large disparities and can be higher than numbers computed that way.
* a non-finite prediction on an evaluated pixel counts as an infinitely large error (bad for every BP-x and D1,
  EPE inf), so a broken model cannot look good.

Definitions (error e = |pred - gt| in pixels of the evaluated resolution):
* `epe`: mean e;
* `bp_x` (x in 0.5, 1, 2, 3, 4): percentage of pixels with e > x;
* `d1` (KITTI): percentage of pixels with e > 3 px and e > 5 % of gt.

An image whose region is empty gets None for that region's values; such None values are left out of the
per-image means (and a mean over no images is None). Pooled values divide the summed errors/counts of all
images by their summed pixel counts, so large images weigh more; `mean_image` averages the per-image values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

THRESHOLDS: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0)
REGIONS: tuple[str, ...] = ("", "_noc")  # key suffixes: all evaluated pixels, non-occluded ones


def _threshold_key(x: float) -> str:
    return f"bp_{x:g}"


# The order of the per-region count vector: pixels, error sum, one bad count per threshold, D1 count.
METRIC_NAMES: tuple[str, ...] = ("epe", *(_threshold_key(x) for x in THRESHOLDS), "d1")
_COUNT_LEN = 2 + len(THRESHOLDS) + 1


def unit(key: str) -> str:
    """The unit of a metric key (`epe`, `val/bp_2_noc/pooled`, `d1/mean_image`): px for EPE, % for BP-x and D1."""
    for part in key.split("/"):
        name = part.removesuffix("_noc")
        if name == "epe":
            return "px"
        if name == "d1" or name.startswith("bp_"):
            return "%"
    return ""


def with_unit(key: str) -> str:
    """`val/epe/pooled (px)`: how tables, sheets and plot axes name a metric."""
    return f"{key} ({unit(key)})" if unit(key) else key


def _as_2d(array: Any, name: str) -> np.ndarray:
    """numpy or torch, shape (H,W), (1,H,W) or (1,1,H,W) -> (H,W) numpy."""
    if hasattr(array, "detach"):  # a torch tensor (kept duck-typed so this module does not import torch)
        array = array.detach().float().cpu().numpy() if array.dtype.is_floating_point else array.detach().cpu().numpy()
    array = np.asarray(array)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{name}: expected an (H, W) map, got shape {array.shape}")
    return array


def region_counts(error: np.ndarray, gt: np.ndarray, region: np.ndarray) -> np.ndarray:
    """[pixels, error sum, bad count per threshold..., D1 count] over the pixels where `region` is true."""
    e = error[region].astype(np.float64)
    g = gt[region].astype(np.float64)
    bad = [np.count_nonzero(e > x) for x in THRESHOLDS]
    d1 = np.count_nonzero((e > 3.0) & (e > 0.05 * g))
    return np.array([e.size, e.sum(), *bad, d1], dtype=np.float64)


def counts_to_values(counts: np.ndarray) -> dict[str, float | None]:
    """EPE, BP-x %, D1 % from a count vector; None for every value when the region is empty."""
    pixels = counts[0]
    if pixels == 0:
        return {name: None for name in METRIC_NAMES}
    values = [counts[1] / pixels, *(100.0 * counts[2:] / pixels)]
    return {name: float(v) for name, v in zip(METRIC_NAMES, values)}


def image_counts(pred: Any, gt: Any, valid: Any = None, nocc: Any = None,
                 max_disp: float | None = None) -> dict[str, np.ndarray | None]:
    """Count vectors of one image per region suffix ("" and "_noc"; "_noc" is None without an nocc mask)."""
    pred, gt = _as_2d(pred, "pred").astype(np.float32), _as_2d(gt, "gt").astype(np.float32)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt differ in shape: {pred.shape} vs {gt.shape}")
    finite_gt = np.isfinite(gt)
    if valid is None:
        region = finite_gt & (np.where(finite_gt, gt, 0) > 0)
    else:
        valid = _as_2d(valid, "valid")
        if valid.shape != gt.shape:
            raise ValueError(f"valid mask shape {valid.shape} differs from gt {gt.shape}")
        region = finite_gt & valid.astype(bool)
    if max_disp is not None:
        region &= np.where(finite_gt, gt, np.inf) < max_disp
    with np.errstate(invalid="ignore"):
        error = np.where(np.isfinite(pred), np.abs(pred - gt), np.inf)
    out: dict[str, np.ndarray | None] = {"": region_counts(error, gt, region), "_noc": None}
    if nocc is not None:
        nocc = _as_2d(nocc, "nocc")
        if nocc.shape != gt.shape:
            raise ValueError(f"nocc mask shape {nocc.shape} differs from gt {gt.shape}")
        out["_noc"] = region_counts(error, gt, region & nocc.astype(bool))
    return out


def _flatten(per_region: dict[str, np.ndarray | None]) -> dict[str, float | None]:
    values: dict[str, float | None] = {}
    for suffix in REGIONS:
        counts = per_region[suffix]
        region_values = counts_to_values(counts) if counts is not None else {n: None for n in METRIC_NAMES}
        values.update({f"{name}{suffix}": v for name, v in region_values.items()})
        values[f"pixels{suffix}"] = int(counts[0]) if counts is not None else None
    return values


def image_metrics(pred: Any, gt: Any, valid: Any = None, nocc: Any = None,
                  max_disp: float | None = None) -> dict[str, float | None]:
    """Per-image metrics: `epe`, `bp_0.5` ... `bp_4`, `d1`, the same with `_noc`, and `pixels`, `pixels_noc`."""
    return _flatten(image_counts(pred, gt, valid, nocc, max_disp))


class MetricAccumulator:
    """Adds images one by one; `summary()` gives `<metric>/pooled` and `<metric>/mean_image` for every metric."""

    def __init__(self, max_disp: float | None = None):
        self.max_disp = max_disp
        self.totals = {suffix: np.zeros(_COUNT_LEN) for suffix in REGIONS}
        self.rows: list[dict[str, float | None]] = []

    def add(self, pred: Any, gt: Any, valid: Any = None, nocc: Any = None) -> dict[str, float | None]:
        """Accumulate one image and return its per-image metrics."""
        per_region = image_counts(pred, gt, valid, nocc, self.max_disp)
        for suffix, counts in per_region.items():
            if counts is not None:
                self.totals[suffix] += counts
        row = _flatten(per_region)
        self.rows.append(row)
        return row

    def summary(self) -> dict[str, float | int | None]:
        out: dict[str, float | int | None] = {"images": len(self.rows)}
        for suffix in REGIONS:
            pooled = counts_to_values(self.totals[suffix])
            for name in METRIC_NAMES:
                key = f"{name}{suffix}"
                per_image = [row[key] for row in self.rows if row[key] is not None]
                out[f"{key}/pooled"] = pooled[name]
                out[f"{key}/mean_image"] = float(np.mean(per_image)) if per_image else None
            out[f"pixels{suffix}"] = int(self.totals[suffix][0])
        return out
