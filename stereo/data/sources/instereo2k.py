"""InStereo2K (indoor, structured light): PNG pairs, uint16 PNG disparity of both views (value / 100, 0 = none)."""

from __future__ import annotations

from pathlib import Path

from stereo.data.sample import RawSample
from stereo.data.sources.common import first_dir, one_of, sample_key

LAYOUT = """ROOT/train/part{1..5}/<NNNNNN>/left.png, right.png, left_disp.png, right_disp.png
ROOT/test/<NNNNNN>/... (same files)   (uint16, disparity * 100, 0 = invalid)"""


def list_samples(root: Path, *, split: str = "all") -> list[RawSample]:
    """split: train, test or all (the 50 test pairs also come with ground truth)."""
    one_of("split", split, ("train", "test", "all"))
    top = root if split == "all" else first_dir(root, split)
    if top is None:
        return []
    samples = []
    for disp in sorted(top.rglob("left_disp.png")):
        folder = disp.parent
        right_disp = folder / "right_disp.png"
        samples.append(RawSample(
            key=sample_key(folder.relative_to(root)),
            source="instereo2k",
            left=str(folder / "left.png"),
            right=str(folder / "right.png"),
            target=str(disp),
            codec="instereo2k.png",
            target_right=str(right_disp) if right_disp.is_file() else None,
        ))
    return samples
