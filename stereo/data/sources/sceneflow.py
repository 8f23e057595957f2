"""Scene Flow (Mayer et al. 2016): FlyingThings3D, Driving, Monkaa; PNG frames, PFM disparities of both views."""

from __future__ import annotations

from pathlib import Path

from stereo.data.sample import RawSample
from stereo.data.sources.common import SourceError, first_dir, one_of, sample_key, split_list

LAYOUT = """ROOT/FlyingThings3D/frames_cleanpass/{TRAIN,TEST}/{A,B,C}/NNNN/{left,right}/NNNN.png
ROOT/FlyingThings3D/frames_finalpass/...            (same tree)
ROOT/FlyingThings3D/disparity/TRAIN/A/0000/{left,right}/NNNN.pfm
ROOT/Driving/frames_cleanpass/{15,35}mm_focallength/scene_{forwards,backwards}/{fast,slow}/{left,right}/NNNN.png
ROOT/Driving/disparity/... (same tree, .pfm)
ROOT/Monkaa/frames_cleanpass/<scene>/{left,right}/NNNN.png, ROOT/Monkaa/disparity/<scene>/{left,right}/NNNN.pfm"""

SUBSETS = ("flyingthings3d", "driving", "monkaa")
PASSES = {"clean": ("clean",), "final": ("final",), "both": ("clean", "final")}


def list_samples(root: Path, *, subsets: str = "all", passes: str = "clean", split: str = "train") -> list[RawSample]:
    """split=train: FlyingThings3D TRAIN + Driving + Monkaa; split=test: FlyingThings3D TEST (the usual benchmark).
    passes: clean, final or both; subsets: comma list of flyingthings3d, driving, monkaa (or all)."""
    one_of("split", split, ("train", "test"))
    one_of("passes", passes, tuple(PASSES))
    wanted = split_list("subsets", subsets, SUBSETS)
    if split == "test":
        wanted = [s for s in wanted if s == "flyingthings3d"]
    samples = []
    for subset in wanted:
        base = first_dir(root, {"flyingthings3d": "FlyingThings3D", "driving": "Driving", "monkaa": "Monkaa"}[subset])
        if base is None:
            continue
        for pass_name in PASSES[passes]:
            frames = base / f"frames_{pass_name}pass"
            top = frames
            if subset == "flyingthings3d":
                top = first_dir(frames, split.upper()) if frames.is_dir() else None
            if top is None or not top.is_dir():
                continue
            for left in sorted(top.rglob("left/*.png")):
                rel = left.relative_to(frames)
                disp = base / "disparity" / rel.with_suffix(".pfm")
                if not disp.is_file():
                    raise SourceError(f"{left}: no disparity file {disp}")
                right_disp = disp.parent.parent / "right" / disp.name
                samples.append(RawSample(
                    key=sample_key(base.name, pass_name, rel.parent.parent, rel.stem),
                    source="sceneflow",
                    left=str(left),
                    right=str(left.parent.parent / "right" / left.name),
                    target=str(disp),
                    codec="pfm",
                    target_right=str(right_disp) if right_disp.is_file() else None,
                ))
    return samples
