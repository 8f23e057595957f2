"""FoundationStereo Dataset (FSD, NVIDIA): JPEG pairs, left disparity packed into RGB PNGs (base 255, milli-px)."""

from __future__ import annotations

from pathlib import Path

from stereo.data.sample import RawSample
from stereo.data.sources.common import sample_key

LAYOUT = """ROOT/<scene>/dataset/data/left/rgb/NNNN.jpg
ROOT/<scene>/dataset/data/right/rgb/NNNN.jpg
ROOT/<scene>/dataset/data/left/disparity/NNNN.png   (RGB: disparity = (R*255*255 + G*255 + B) / 1000)"""


def list_samples(root: Path) -> list[RawSample]:
    samples = []
    for left in sorted(root.glob("*/dataset/data/left/rgb/*.jpg")):
        data = left.parents[2]
        scene = data.parents[1].name
        samples.append(RawSample(
            key=sample_key(scene, left.stem),
            source="fsd",
            left=str(left),
            right=str(data / "right" / "rgb" / left.name),
            target=str(data / "left" / "disparity" / f"{left.stem}.png"),
            codec="fsd.png",
        ))
    return samples
