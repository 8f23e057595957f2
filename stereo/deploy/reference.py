"""The reference pair of an export: the Middlebury 2014 motorcycle pair that scikit-image bundles, at a given size."""

from __future__ import annotations

import cv2
import numpy as np


def motorcycle() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left, right) (H,W,3) uint8 RGB and the ground-truth disparity (H,W) float32, as `make demo-pair` writes."""
    from skimage.data import stereo_motorcycle

    left, right, disp = stereo_motorcycle()
    return left, right, disp.astype(np.float32)


def reference_pair(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The motorcycle pair resized (area filter) to height x width: real image content at any export size."""
    left, right, _ = motorcycle()
    if left.shape[:2] == (height, width):
        return left, right
    resize = lambda x: cv2.resize(x, (width, height), interpolation=cv2.INTER_AREA)  # noqa: E731
    return resize(left), resize(right)
