"""CREStereo synthetic set (Li et al. 2022): JPEG pairs, uint16 PNG disparity of both views (value / 32)."""

from __future__ import annotations

from pathlib import Path

from stereo.data.sample import RawSample
from stereo.data.sources.common import sample_key

LAYOUT = """ROOT/{tree,shapenet,reflective,hole}/<name>_left.jpg, <name>_right.jpg,
<name>_left.disp.png, <name>_right.disp.png   (uint16, disparity * 32)"""


def list_samples(root: Path) -> list[RawSample]:
    samples = []
    for left in sorted(root.rglob("*_left.jpg")):
        stem = left.name[: -len("_left.jpg")]
        right_disp = left.with_name(f"{stem}_right.disp.png")
        samples.append(RawSample(
            key=sample_key(left.parent.relative_to(root), stem),
            source="crestereo",
            left=str(left),
            right=str(left.with_name(f"{stem}_right.jpg")),
            target=str(left.with_name(f"{stem}_left.disp.png")),
            codec="crestereo.png",
            target_right=str(right_disp) if right_disp.is_file() else None,
        ))
    return samples
