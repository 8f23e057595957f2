"""KITTI stereo 2012 and 2015: training pairs `NNNNNN_10.png`, sparse LiDAR disparity as 16-bit PNG (x256)."""

from __future__ import annotations

from pathlib import Path

from stereo.data.sample import MaskFile, RawSample
from stereo.data.sources.common import SourceError, first_dir, one_of, sample_key

LAYOUT_2012 = """ROOT/training/colored_0/NNNNNN_10.png, ROOT/training/colored_1/NNNNNN_10.png   (or gray image_0/image_1)
ROOT/training/disp_occ/NNNNNN_10.png, ROOT/training/disp_noc/NNNNNN_10.png   (uint16, disparity*256, 0 = none)
(ROOT may also be the training folder itself)"""

LAYOUT_2015 = """ROOT/training/image_2/NNNNNN_10.png, ROOT/training/image_3/NNNNNN_10.png
ROOT/training/disp_occ_0/NNNNNN_10.png, ROOT/training/disp_noc_0/NNNNNN_10.png   (uint16, disparity*256)
(ROOT may also be the training folder itself)"""


def _training(root: Path) -> Path:
    return first_dir(root, "training") or root


def _pairs(source: str, training: Path, views: tuple[str, str], occ: str, noc: str) -> list[RawSample]:
    left_dir, right_dir = training / views[0], training / views[1]
    samples = []
    for left in sorted(left_dir.glob("*_10.png")):
        disp = training / occ / left.name
        if not disp.is_file():
            raise SourceError(f"{left}: no ground truth {disp}")
        nocc = training / noc / left.name
        samples.append(RawSample(
            key=sample_key(left.stem),
            source=source,
            left=str(left),
            right=str(right_dir / left.name),
            target=str(disp),
            codec="kitti.png",
            nocc_masks=(MaskFile(str(nocc), "nonzero"),) if nocc.is_file() else (),
        ))
    return samples


def list_kitti12(root: Path, *, images: str = "auto") -> list[RawSample]:
    """images: colored (colored_0/1), gray (image_0/1) or auto (colored when present)."""
    one_of("images", images, ("auto", "colored", "gray"))
    training = _training(root)
    colored = (training / "colored_0").is_dir()
    if images == "colored" or (images == "auto" and colored):
        views = ("colored_0", "colored_1")
    else:
        views = ("image_0", "image_1")
    return _pairs("kitti12", training, views, "disp_occ", "disp_noc")


def list_kitti15(root: Path) -> list[RawSample]:
    return _pairs("kitti15", _training(root), ("image_2", "image_3"), "disp_occ_0", "disp_noc_0")
