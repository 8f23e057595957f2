"""Pictures carry their labels: panel column headers and colour bars, the summary sheet's title and captions at a
legible size, `infer`'s colour bar. Checked on the pixels: the bands exist, hold dark text and turbo colours."""

import numpy as np
import pytest
from PIL import Image

from stereo.pictures import (PANEL_COLUMNS, disparity_panel, disparity_tiles, nice_ticks, summary_sheet, text_size,
                             turbo, with_caption, with_disparity_bar)

WHITE = 255


def dark(pixels: np.ndarray) -> int:
    """Text pixels: near black (the labels are drawn in black on white)."""
    return int((pixels.max(axis=-1) < 110).sum())


def coloured(pixels: np.ndarray) -> np.ndarray:
    """Pixels of a saturated colour (colour bars), neither white, grey nor black."""
    return (pixels.max(axis=-1).astype(int) - pixels.min(axis=-1)) > 60


def sample(height: int = 96, width: int = 192, seed: int = 0):
    rng = np.random.default_rng(seed)
    left = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    gt = np.tile(np.linspace(5, 60, width, dtype=np.float32), (height, 1))
    valid = np.ones_like(gt, bool)
    valid[:, :10] = False
    return left, gt, gt + rng.normal(0, 2, gt.shape).astype(np.float32), valid


def tiles_offset(panel: np.ndarray, tiles: np.ndarray) -> int:
    rows = tiles.shape[0]
    return next(r for r in range(panel.shape[0] - rows + 1) if np.array_equal(panel[r:r + rows], tiles))


@pytest.mark.parametrize("height, width", [(96, 192), (160, 320), (500, 741)])
def test_panel_has_column_headers_and_colour_bars(height, width):
    left, gt, pred, valid = sample(height, width)
    tiles, vmin, vmax = disparity_tiles(left, gt, pred, valid)
    panel = disparity_panel(left, gt, pred, valid)
    assert panel.dtype == np.uint8 and panel.shape[1] == 4 * width
    top = tiles_offset(panel, tiles)  # the tiles sit unchanged between the header and the footer
    header, footer = panel[:top], panel[top + height:]
    assert top >= text_size(width) and footer.shape[0] >= text_size(width)
    assert PANEL_COLUMNS == ("left image", "ground truth", "prediction", "error")
    columns = [header[:, c * width:(c + 1) * width] for c in range(4)]
    assert all(dark(column) > 15 for column in columns)  # a header over every column
    assert len({column.tobytes() for column in columns}) == 4  # four different labels
    # below ground truth and prediction a colour bar (a row of turbo colours), then its numbers; the same under error
    for span in (slice(width, 3 * width), slice(3 * width, 4 * width)):
        bar_rows = [r for r in range(footer.shape[0]) if coloured(footer[r, span]).mean() > 0.8]
        assert bar_rows, "no colour bar"
        assert dark(footer[bar_rows[-1] + 1:, span]) > 10  # tick labels under the bar
    assert dark(footer[:, :width]) > 15  # "black: no ground truth"
    assert nice_ticks(vmin, vmax)  # the disparity bar has values on it


def test_nice_ticks_are_round_and_inside_the_range():
    assert nice_ticks(3.2, 58.7) == [10, 20, 30, 40, 50]
    assert nice_ticks(0.12, 0.9) == [0.2, 0.4, 0.6, 0.8]
    assert nice_ticks(5.0, 5.0) == [5.0]


def test_summary_sheet_is_legible(tmp_path):
    paths = []
    for index in range(4):
        path = tmp_path / f"{index}.png"
        Image.fromarray(disparity_panel(*sample(seed=index))).save(path)
        paths.append(path)
    out = tmp_path / "summary.png"
    table = [("epe/pooled", 1.234), ("bp_2/pooled", 12.5)]
    summary_sheet(out, "KITTI 2015 training, a long title that has to wrap over more than one line of the sheet "
                       "(ranked by d1)", table, [("a", 9.0, paths[0]), ("b", 8.0, paths[1])],
                  [("c", 1.0, paths[2]), ("d", 2.0, paths[3])], "d1")
    with Image.open(out) as image:
        sheet = np.asarray(image.convert("RGB"))
    assert sheet.shape[1] == 1280 and sheet.shape[0] < 3000
    # the title is large: its first line of text is at least 20 px tall (the old sheet's text was ~10 px)
    text_rows = [dark(sheet[r:r + 1, :]) > 0 for r in range(200)]
    first = text_rows.index(True)
    assert text_rows[first:].index(False) >= 20
    # the title wrapped inside the sheet: nothing written in the right margin
    assert dark(sheet[:200, -20:]) == 0


def test_infer_colour_picture_has_a_colour_bar_below():
    disp = np.tile(np.linspace(10, 50, 300, dtype=np.float32), (120, 1))
    rgb = turbo((disp - 10) / 40)
    legend = with_disparity_bar(rgb, 10.0, 50.0)
    assert legend.shape[1] == 300 and legend.shape[0] > 120
    assert np.array_equal(legend[:120], rgb)  # the picture itself is untouched
    band = legend[120:]
    assert any(coloured(band[r]).mean() > 0.5 for r in range(band.shape[0]))
    assert dark(band) > 30  # "disparity" and the tick values


def test_a_logged_picture_carries_its_caption_above():
    """Validation pictures say their name, step and EPE in the picture (RunLogger.log_image), not only in the file
    name."""
    panel = disparity_panel(*sample())
    captioned = with_caption(panel, "val/disparity_0 at step 300, motorcycle: EPE 12.66 px")
    band = captioned.shape[0] - panel.shape[0]
    assert captioned.shape[1] == panel.shape[1] and band >= text_size(panel.shape[1] // 3)
    assert (captioned[band:] == panel).all()
    assert dark(captioned[:band]) > 50 and (captioned[:band] >= 110).mean() > 0.8  # dark text on a white band
