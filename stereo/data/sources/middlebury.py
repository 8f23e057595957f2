"""Middlebury 2014 (full scenes, `-perfect`/`-imperfect`) and the MiddEval3 benchmark training sets (F/H/Q)."""

from __future__ import annotations

from pathlib import Path

from stereo.data.sample import RawSample
from stereo.data.sources.common import SourceError, first_dir, one_of, read_calib, sample_key, two_view_gt_sample

LAYOUT_2014 = """ROOT/<Scene>-{perfect,imperfect}/im0.png, im1.png (im1E.png, im1L.png), disp0.pfm, disp1.pfm, calib.txt
(PFM disparity, inf = unknown; calib.txt: cam0, baseline in mm, doffs)"""

LAYOUT_EVAL3 = """ROOT/training{F,H,Q}/<Scene>/im0.png, im1.png, disp0GT.pfm, mask0nocc.png (255 = non-occluded), calib.txt
(ROOT is the MiddEval3 folder; the GT comes from MiddEval3-GT0-{F,H,Q}.zip unpacked into the same tree)"""


def list_middlebury2014(root: Path, *, right: str = "im1") -> list[RawSample]:
    """right: im1 (default exposure and lighting), im1E (other exposure) or im1L (other lighting)."""
    one_of("right", right, ("im1", "im1E", "im1L"))
    samples = []
    for disp in sorted(root.glob("*/disp0.pfm")):
        scene = disp.parent
        left = scene / "im0.png"
        if not left.is_file():
            raise SourceError(f"{scene}: has disp0.pfm but no im0.png")
        right_disp = scene / "disp1.pfm"
        samples.append(RawSample(
            key=sample_key(scene.name),
            source="middlebury2014",
            left=str(left),
            right=str(scene / f"{right}.png"),
            target=str(disp),
            codec="pfm",
            target_right=str(right_disp) if right_disp.is_file() else None,
            meta=read_calib(scene / "calib.txt"),
        ))
    return samples


def list_middeval3(root: Path, *, resolution: str = "F") -> list[RawSample]:
    """resolution: F (full), H (half) or Q (quarter)."""
    one_of("resolution", resolution, ("F", "H", "Q"))
    training = root if root.name == f"training{resolution}" else first_dir(root, f"training{resolution}")
    if training is None:
        return []
    samples = []
    for left in sorted(training.glob("*/im0.png")):
        scene = left.parent
        disp = scene / "disp0GT.pfm"
        if not disp.is_file():
            raise SourceError(f"{scene}: no disp0GT.pfm (unpack MiddEval3-GT0-{resolution}.zip into {root})")
        samples.append(two_view_gt_sample(sample_key(resolution, scene.name), "middeval3", scene, scene))
    return samples
