"""Pictures and tables of an evaluation: colour maps in numpy, the per-image panel, the summary sheet, markdown.

`disparity_panel` is also what the trainer logs as validation images, so it stays numpy-only and cheap.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

# A turbo-like map (dark blue -> cyan -> green -> yellow -> red -> dark red): anchors read off the turbo map's
# look and interpolated linearly; perceptually close enough for disparity, and no plotting library needed.
_TURBO_ANCHORS = np.array([
    [48, 18, 59], [70, 107, 227], [40, 188, 235], [50, 241, 153], [164, 252, 60],
    [237, 208, 58], [251, 128, 34], [215, 53, 6], [122, 4, 3],
], dtype=np.float32)
INVALID_COLOUR = (0, 0, 0)
# Errors are shown on a log scale up to this many pixels (1 px sits about a third of the way up).
ERROR_MAP_MAX_PX = 16.0


def turbo(t: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped; NaN -> 0) -> uint8 RGB of the same shape plus a last axis of 3."""
    t = np.nan_to_num(np.clip(t, 0.0, 1.0), nan=0.0) * (len(_TURBO_ANCHORS) - 1)
    low = np.minimum(t.astype(np.int64), len(_TURBO_ANCHORS) - 2)
    frac = (t - low)[..., None]
    rgb = _TURBO_ANCHORS[low] * (1.0 - frac) + _TURBO_ANCHORS[low + 1] * frac
    return np.round(rgb).astype(np.uint8)


def colorize_disparity(disp: np.ndarray, vmin: float, vmax: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Disparity -> turbo RGB over [vmin, vmax]; pixels outside `mask` (or non-finite) are black."""
    disp = np.asarray(disp, dtype=np.float32)
    rgb = turbo((disp - vmin) / max(vmax - vmin, 1e-6))
    hidden = ~np.isfinite(disp) if mask is None else ~(mask & np.isfinite(disp))
    rgb[hidden] = INVALID_COLOUR
    return rgb


def colorize_error(error: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Absolute error (px) -> turbo on a log scale from 0 to ERROR_MAP_MAX_PX; black outside `mask`."""
    t = np.log1p(np.nan_to_num(error, nan=ERROR_MAP_MAX_PX, posinf=ERROR_MAP_MAX_PX)) / math.log1p(ERROR_MAP_MAX_PX)
    rgb = turbo(t)
    rgb[~mask] = INVALID_COLOUR
    return rgb


def disparity_panel(left: np.ndarray, gt: np.ndarray, pred: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """left | ground truth | prediction | error map, as one uint8 (H, 4W, 3) image.

    Ground truth and prediction share one colour scale (the 1st-99th percentile range of the valid ground truth,
    or of the prediction where no pixel is valid), so colours compare directly.
    """
    left = np.asarray(left)
    if left.ndim == 3 and left.shape[0] == 3 and left.shape[-1] != 3:  # CHW tensor layout
        left = left.transpose(1, 2, 0)
    left = np.clip(left, 0, 255).astype(np.uint8)
    gt, pred = np.asarray(gt, np.float32).squeeze(), np.asarray(pred, np.float32).squeeze()
    valid = np.asarray(valid, bool).squeeze() & np.isfinite(gt)
    reference = gt[valid] if valid.any() else pred[np.isfinite(pred)]
    vmin, vmax = (np.percentile(reference, [1, 99]) if reference.size else (0.0, 1.0))
    error = np.abs(pred - np.where(valid, gt, 0))
    return np.concatenate([
        left,
        colorize_disparity(gt, vmin, vmax, valid),
        colorize_disparity(pred, vmin, vmax),
        colorize_error(error, valid),
    ], axis=1)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _thumbnail(path: Path, width: int) -> Image.Image:
    image = Image.open(path).convert("RGB")
    return image.resize((width, max(1, round(image.height * width / image.width))), Image.BILINEAR)


def summary_sheet(out_path: Path, title: str, table: Sequence[tuple[str, Any]],
                  worst: Sequence[tuple[str, float | None, Path]], best: Sequence[tuple[str, float | None, Path]],
                  max_width: int = 2048) -> None:
    """One PNG: the metric table, then the worst and the best images' panels (name, headline value, panel path),
    each panel scaled to the sheet's width (the widest panel's, at most `max_width`)."""
    line, value_x = 16, 240
    with Image.open((list(worst) + list(best))[0][2]) as first:
        width = max(min(first.width, max_width), 2 * value_x)
    sections = [("worst", worst), ("best", best)]
    tiles = [(f"{label}: {name}  {_fmt(value)}", _thumbnail(path, width))
             for label, items in sections for name, value, path in items]
    height = line * (len(table) + 3) + sum(line + tile.height + 4 for _, tile in tiles)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 4), title, fill=(0, 0, 0))
    y = 4 + 2 * line
    for name, value in table:
        draw.text((8, y), name, fill=(0, 0, 0))
        draw.text((value_x, y), _fmt(value), fill=(0, 0, 0))
        y += line
    y += line
    for caption, tile in tiles:
        draw.text((8, y), caption, fill=(0, 0, 0))
        y += line
        sheet.paste(tile, (0, y))
        y += tile.height + 4
    sheet.save(out_path)
