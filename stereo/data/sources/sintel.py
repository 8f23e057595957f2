"""MPI Sintel stereo: clean/final renders, packed RGB disparity, occlusion and out-of-frame masks (255 = excluded)."""

from __future__ import annotations

from pathlib import Path

from stereo.data.sample import MaskFile, RawSample
from stereo.data.sources.common import first_dir, one_of, sample_key

LAYOUT = """ROOT/training/{clean,final}_{left,right}/<scene>/frame_NNNN.png
ROOT/training/disparities/<scene>/frame_NNNN.png   (RGB: disparity = R*4 + G/2^6 + B/2^14)
ROOT/training/occlusions/<scene>/frame_NNNN.png, ROOT/training/outofframe/<scene>/frame_NNNN.png (255 = excluded)
(ROOT may also be the training folder itself)"""

PASSES = {"clean": ("clean",), "final": ("final",), "both": ("clean", "final")}


def list_samples(root: Path, *, passes: str = "clean") -> list[RawSample]:
    """passes: clean, final or both. nocc = neither occluded nor out of frame."""
    one_of("passes", passes, tuple(PASSES))
    training = first_dir(root, "training") or root
    samples = []
    for pass_name in PASSES[passes]:
        for left in sorted(training.glob(f"{pass_name}_left/*/frame_*.png")):
            scene, name = left.parent.name, left.name
            masks = tuple(MaskFile(str(training / folder / scene / name), "zero")
                          for folder in ("occlusions", "outofframe") if (training / folder / scene / name).is_file())
            samples.append(RawSample(
                key=sample_key(pass_name, scene, left.stem),
                source="sintel",
                left=str(left),
                right=str(training / f"{pass_name}_right" / scene / name),
                target=str(training / "disparities" / scene / name),
                codec="sintel.png",
                nocc_masks=masks,
            ))
    return samples
