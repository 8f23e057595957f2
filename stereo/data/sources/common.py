"""Helpers shared by the data-set sources: errors, keys, directory checks, Middlebury-style calib files."""

from __future__ import annotations

import re
from pathlib import Path

from stereo.data.sample import MaskFile, RawSample


class SourceError(ValueError):
    """A data-set path that is missing, empty or laid out differently; the message names it and the layout."""


def sample_key(*parts: str | Path) -> str:
    """A WebDataset-safe key from path parts: '/'-joined, dots and spaces replaced (keys must not hold dots)."""
    text = "/".join(str(part).strip("/") for part in parts if str(part))
    return re.sub(r"[.\s]", "_", text)


def one_of(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SourceError(f"option {name}={value!r}: expected one of {', '.join(choices)}")
    return value


def split_list(name: str, value: str, choices: tuple[str, ...]) -> list[str]:
    """'a,b' -> ['a', 'b'], each checked against choices; 'all' -> every choice."""
    if value == "all":
        return list(choices)
    items = [item.strip() for item in value.split(",") if item.strip()]
    for item in items:
        one_of(name, item, choices)
    return items


def first_dir(root: Path, *names: str) -> Path | None:
    """The first of root/name that is a directory (case-insensitive on the last component), or None."""
    for name in names:
        if (root / name).is_dir():
            return root / name
    wanted = {name.lower() for name in names}
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if child.is_dir() and child.name.lower() in wanted:
            return child
    return None


def read_calib(path: Path) -> dict[str, float]:
    """Middlebury/ETH3D calib.txt -> focal (px), baseline (m), doffs (px); {} when the file is missing.

    Lines are `cam0=[f 0 cx; 0 f cy; 0 0 1]`, `baseline=193.001` (mm), `doffs=...`, `ndisp=...`.
    """
    if not path.is_file():
        return {}
    fields = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    calib = {}
    if "cam0" in fields:
        calib["focal"] = float(fields["cam0"].strip(" []").split()[0])
    if "baseline" in fields:
        calib["baseline"] = float(fields["baseline"]) / 1000.0
    for name in ("doffs", "ndisp"):
        if name in fields:
            calib[name] = float(fields[name])
    return calib


def two_view_gt_sample(key: str, source: str, scene: Path, gt: Path) -> RawSample:
    """The Middlebury-style two-view layout that MiddEval3 and ETH3D share: `scene` holds im0.png, im1.png and
    calib.txt, `gt` holds disp0GT.pfm (inf = unknown) and, where published, mask0nocc.png (255 = non-occluded)."""
    mask = gt / "mask0nocc.png"
    return RawSample(
        key=key,
        source=source,
        left=str(scene / "im0.png"),
        right=str(scene / "im1.png"),
        target=str(gt / "disp0GT.pfm"),
        codec="pfm",
        nocc_masks=(MaskFile(str(mask), "eq255"),) if mask.is_file() else (),
        meta=read_calib(scene / "calib.txt"),
    )
