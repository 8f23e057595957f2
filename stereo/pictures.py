"""Pictures and tables that training, evaluation, sweeps and inference show: colour maps in numpy, the labelled
disparity panel, the summary sheet, markdown tables. A bottom-layer module (numpy and PIL only), so that every layer
above can draw without importing another's code.

`disparity_panel` is also what the trainer logs as training and validation images, so it stays cheap: numpy for the
colours, PIL (its bundled font) for the labels and colour bars.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


PANEL_COLUMNS = ("left image", "ground truth", "prediction", "error")
ERROR_TICKS_PX = (0, 1, 2, 4, 8, 16)
NO_GT_NOTE = "black: no ground truth"


def disparity_tiles(left: np.ndarray, gt: np.ndarray, pred: np.ndarray, valid: np.ndarray
                    ) -> tuple[np.ndarray, float, float]:
    """left | ground truth | prediction | error map as one uint8 (H, 4W, 3) image, and the disparity scale.

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
    vmin, vmax = (float(v) for v in (np.percentile(reference, [1, 99]) if reference.size else (0.0, 1.0)))
    error = np.abs(pred - np.where(valid, gt, 0))
    tiles = np.concatenate([
        left,
        colorize_disparity(gt, vmin, vmax, valid),
        colorize_disparity(pred, vmin, vmax),
        colorize_error(error, valid),
    ], axis=1)
    return tiles, vmin, vmax


def disparity_panel(left: np.ndarray, gt: np.ndarray, pred: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The four tiles of `disparity_tiles` with column headers above, and below them the disparity colour bar (px,
    under ground truth and prediction), the error colour bar (px, log scale) and what black means."""
    tiles, vmin, vmax = disparity_tiles(left, gt, pred, valid)
    height, width = tiles.shape[:2]
    tile = width // 4
    size = text_size(tile)
    pad = max(2, size // 3)
    header, bar = size + 2 * pad, max(6, size * 2 // 3)
    canvas = Image.new("RGB", (width, header + height + 3 * pad + bar + size), (255, 255, 255))
    canvas.paste(Image.fromarray(tiles), (0, header))
    draw = ImageDraw.Draw(canvas)
    for column, name in enumerate(PANEL_COLUMNS):
        _text(draw, (column * tile + tile / 2, header / 2), name, size, (column * tile, (column + 1) * tile))
    top = header + height + pad
    _text(draw, (tile / 2, top + bar / 2), NO_GT_NOTE, size, (0, tile))
    _colour_bar(canvas, (tile + pad, 3 * tile - pad), (tile, 3 * tile), top, bar, size,
                [((v - vmin) / max(vmax - vmin, 1e-6), v) for v in nice_ticks(vmin, vmax)])
    log_max = math.log1p(ERROR_MAP_MAX_PX)
    _colour_bar(canvas, (3 * tile + pad, 4 * tile - pad), (3 * tile, width), top, bar, size,
                [(math.log1p(v) / log_max, v) for v in ERROR_TICKS_PX])
    return np.asarray(canvas)


def with_caption(image: np.ndarray, caption: str) -> np.ndarray:
    """`image` under a white band holding `caption` (what a logged picture shows: its name, step, EPE), so that the
    picture says it without its file name."""
    height, width = image.shape[:2]
    size = text_size(width // 3)
    band = size + 2 * max(2, size // 3)
    canvas = Image.new("RGB", (width, band + height), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, band))
    _text(ImageDraw.Draw(canvas), (width / 2, band / 2), caption, size, (0, width))
    return np.asarray(canvas)


def with_disparity_bar(rgb: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """A colourised disparity map with its colour bar (px) in a band below: the legend of `infer`'s colour PNG."""
    height, width = rgb.shape[:2]
    size = text_size(width // 2)
    pad, bar = max(2, size // 3), max(6, size * 2 // 3)
    canvas = Image.new("RGB", (width, height + 3 * pad + bar + size), (255, 255, 255))
    canvas.paste(Image.fromarray(rgb), (0, 0))
    label = "disparity"
    label_width = ImageDraw.Draw(canvas).textlength(label, font=_font(size))
    _text(ImageDraw.Draw(canvas), (pad + label_width / 2, height + pad + bar / 2), label, size, (0, width))
    span = (int(2 * pad + label_width + size), width - pad)
    _colour_bar(canvas, span, (span[0] - size, width), height + pad, bar, size,
                [((v - vmin) / max(vmax - vmin, 1e-6), v) for v in nice_ticks(vmin, vmax)])
    return np.asarray(canvas)


def text_size(width: int) -> int:
    """Label text in proportion to the picture, so that it stays legible when a summary sheet shrinks it."""
    return int(np.clip(round(width / 18), 12, 40))


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text(draw: ImageDraw.ImageDraw, centre: tuple[float, float], text: str, size: int,
          span: tuple[float, float]) -> tuple[float, float]:
    """Black text centred on `centre`, shifted to stay inside `span` (x range); returns its x extent."""
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = min(max(centre[0] - (right - left) / 2, span[0]), span[1] - (right - left))
    draw.text((x - left, centre[1] - (top + bottom) / 2), text, fill=(0, 0, 0), font=font)
    return x, x + right - left


def _colour_bar(canvas: Image.Image, span: tuple[int, int], room: tuple[int, int], top: int, height: int,
                size: int, ticks: list[tuple[float, float]]) -> None:
    """A horizontal turbo bar over `span`, labelled with values (px) at fractions along it, the labels kept inside
    `room`; a label that would overlap the previous one is dropped, the last one carries the unit."""
    x0, x1 = span
    if x1 - x0 < 2:
        return
    canvas.paste(Image.fromarray(np.repeat(turbo(np.linspace(0.0, 1.0, x1 - x0))[None], height, axis=0)), (x0, top))
    draw = ImageDraw.Draw(canvas)
    taken = -math.inf
    for index, (fraction, value) in enumerate(ticks):
        label = f"{value:g}" + (" px" if index == len(ticks) - 1 else "")
        x = x0 + fraction * (x1 - x0 - 1)
        width = draw.textlength(label, font=_font(size))
        if x - width / 2 < taken + size / 3:
            continue
        draw.line([(x, top + height), (x, top + height + size // 4)], fill=(0, 0, 0))
        taken = _text(draw, (x, top + height + size * 3 // 4), label, size, room)[1]


def nice_ticks(vmin: float, vmax: float, count: int = 6) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) inside [vmin, vmax], about `count` of them."""
    if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmax <= vmin:
        return [vmin] if math.isfinite(vmin) else []
    raw = (vmax - vmin) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(vmin / step) * step
    return [round(first + i * step, 10) for i in range(int((vmax - first) / step + 1e-9) + 1)]


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
    with Image.open(path) as image:
        image = image.convert("RGB")
    return image.resize((width, max(1, round(image.height * width / image.width))), Image.LANCZOS)


def summary_sheet(out_path: Path, title: str, table: Sequence[tuple[str, Any]],
                  worst: Sequence[tuple[str, float | None, Path]], best: Sequence[tuple[str, float | None, Path]],
                  rank_key: str = "", width: int = 1280) -> None:
    """One PNG `width` wide: the title, the metric table, then the worst and the best images' labelled panels
    (name, value of `rank_key`, panel path) under a caption each, every panel scaled to the sheet's width."""
    big, body = width // 36, width // 52
    line, margin = round(body * 1.5), body
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_lines = _wrap(measure, title, big, width - 2 * margin)
    sections = [("worst", worst), ("best", best)]
    tiles = [(f"{label} {rank}: {name}   {rank_key} {_fmt(value)}", _thumbnail(path, width))
             for label, items in sections for rank, (name, value, path) in enumerate(items, 1)]
    top = margin + round(1.3 * big) * len(title_lines) + big
    height = top + line * (len(table) + 1) + sum(line + tile.height + margin for _, tile in tiles)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, text in enumerate(title_lines):
        draw.text((margin, margin + round(1.3 * big) * index), text, fill=(0, 0, 0), font=_font(big))
    y = top
    value_x = margin + max(draw.textlength(name, font=_font(body)) for name, _ in table) + 2 * body
    for name, value in table:
        draw.text((margin, y), name, fill=(0, 0, 0), font=_font(body))
        draw.text((value_x, y), _fmt(value), fill=(0, 0, 0), font=_font(body))
        y += line
    y += line
    for caption, tile in tiles:
        draw.text((margin, y), caption, fill=(0, 0, 0), font=_font(body))
        y += line
        sheet.paste(tile, (0, y))
        y += tile.height + margin
    sheet.save(out_path)


def _wrap(draw: ImageDraw.ImageDraw, text: str, size: int, width: float) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` (a single long word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=_font(size)) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]
