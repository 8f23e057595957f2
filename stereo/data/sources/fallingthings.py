"""NVIDIA Falling Things (FAT): JPEG pairs and 16-bit depth (0.1 mm units); baseline 6 cm, fx per scene."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from stereo.data.sample import RawSample
from stereo.data.sources.common import SourceError, sample_key, split_list

LAYOUT = """ROOT/mixed/<scene>/NNNNNN.{left,right}.jpg, NNNNNN.{left,right}.depth.png, _camera_settings.json
ROOT/single/<object>/<scene>/... (same files)
(depth: uint16, 10000 = 1 m; focal = camera_settings[0].intrinsic_settings.fx; baseline 0.06 m)"""

BASELINE_M = 0.06  # FAT README: the stereo cameras are 6 cm apart


@lru_cache(maxsize=None)
def _focal(scene: Path) -> float:
    settings = scene / "_camera_settings.json"
    try:
        return float(json.loads(settings.read_text())["camera_settings"][0]["intrinsic_settings"]["fx"])
    except (OSError, KeyError, IndexError, ValueError) as exc:
        raise SourceError(f"{settings}: expected camera_settings[0].intrinsic_settings.fx ({exc!r})") from None


def list_samples(root: Path, *, subsets: str = "all") -> list[RawSample]:
    """subsets: mixed, single or all."""
    samples = []
    for subset in split_list("subsets", subsets, ("mixed", "single")):
        for left in sorted((root / subset).rglob("*.left.jpg")):
            stem = left.name[: -len(".left.jpg")]
            right_depth = left.with_name(f"{stem}.right.depth.png")
            samples.append(RawSample(
                key=sample_key(left.parent.relative_to(root), stem),
                source="fallingthings",
                left=str(left),
                right=str(left.with_name(f"{stem}.right.jpg")),
                target=str(left.with_name(f"{stem}.left.depth.png")),
                codec="fallingthings.png",
                kind="depth",
                target_right=str(right_depth) if right_depth.is_file() else None,
                meta={"focal": _focal(left.parent), "baseline": BASELINE_M},
            ))
    return samples
