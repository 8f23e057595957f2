"""ETH3D low-res two-view benchmark: gray PNG pairs, PFM ground truth (inf = unknown) and a non-occlusion mask."""

from __future__ import annotations

from pathlib import Path

from stereo.data.sample import RawSample
from stereo.data.sources.common import SourceError, sample_key, two_view_gt_sample

LAYOUT = """ROOT/two_view_training/<scene>/im0.png, im1.png, calib.txt
ROOT/two_view_training_gt/<scene>/disp0GT.pfm, mask0nocc.png (255 = non-occluded)"""


def list_samples(root: Path) -> list[RawSample]:
    samples = []
    for left in sorted(root.glob("two_view_training/*/im0.png")):
        scene = left.parent
        gt = root / "two_view_training_gt" / scene.name
        disp = gt / "disp0GT.pfm"
        if not disp.is_file():
            raise SourceError(f"{scene}: no ground truth {disp} (unpack two_view_training_gt.7z into {root})")
        samples.append(two_view_gt_sample(sample_key(scene.name), "eth3d", scene, gt))
    return samples
