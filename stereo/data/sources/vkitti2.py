"""Virtual KITTI 2: JPEG frames of two cameras, 16-bit depth PNG in cm (65535 = sky); fixed intrinsics."""

from __future__ import annotations

from pathlib import Path

from stereo.data.sample import RawSample
from stereo.data.sources.common import SourceError, sample_key

LAYOUT = """ROOT/SceneNN/<variant>/frames/rgb/Camera_{0,1}/rgb_NNNNN.jpg
ROOT/SceneNN/<variant>/frames/depth/Camera_{0,1}/depth_NNNNN.png   (uint16, cm; from vkitti_2.0.3_depth.tar:
unpack it into the same tree or pass depth_root=...)   focal 725.0087 px, baseline 0.532725 m"""

FOCAL_PX = 725.0087  # VKITTI2 intrinsics: fx = fy = 725.0087 for every camera and frame
BASELINE_M = 0.532725  # Camera_0 to Camera_1, as in the set's extrinsics


def list_samples(root: Path, *, variants: str = "all", depth_root: str = "") -> list[RawSample]:
    """variants: comma list (clone, fog, morning, overcast, rain, sunset, 15-deg-left, ...) or all."""
    depth_base = Path(depth_root) if depth_root else root
    if depth_root and not depth_base.is_dir():
        raise SourceError(f"vkitti2: depth_root {depth_base} is not a directory")
    wanted = None if variants == "all" else {v.strip() for v in variants.split(",")}
    samples = []
    for left in sorted(root.glob("Scene*/*/frames/rgb/Camera_0/rgb_*.jpg")):
        variant_dir = left.parents[3]
        if wanted is not None and variant_dir.name not in wanted:
            continue
        frame = left.stem[len("rgb_"):]
        rel = variant_dir.relative_to(root)
        depth = depth_base / rel / "frames" / "depth" / "Camera_0" / f"depth_{frame}.png"
        right_depth = depth_base / rel / "frames" / "depth" / "Camera_1" / f"depth_{frame}.png"
        samples.append(RawSample(
            key=sample_key(rel, frame),
            source="vkitti2",
            left=str(left),
            right=str(left.parents[1] / "Camera_1" / left.name),
            target=str(depth),
            codec="vkitti2.png",
            kind="depth",
            target_right=str(right_depth) if right_depth.is_file() else None,
            meta={"focal": FOCAL_PX, "baseline": BASELINE_M},
        ))
    return samples
