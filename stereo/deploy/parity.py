"""How far two disparity maps are apart: the figures the parity tests assert and docs/deploy.md tabulates."""

from __future__ import annotations

import numpy as np


def difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """max and mean absolute difference (px) of two same-shaped disparities, and whether both are finite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"disparities differ in shape: {a.shape} vs {b.shape}")
    diff = np.abs(a - b)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "finite": bool(np.isfinite(a).all() and np.isfinite(b).all())}
