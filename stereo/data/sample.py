"""The shard sample: raw files -> tar members (`encode_raw`) and members -> numpy arrays (`decode_sample`).

Members (docs/architecture.md): `left.<jpg|png>`, `right.<jpg|png>` (source bytes, never re-encoded),
`disp.<codec>` or `depth.<codec>` (source bytes; the extension names the codec in `stereo.data.codecs`),
optional `disp_right.<codec>` / `depth_right.<codec>`, optional `valid.png` / `nocc.png` (8-bit, non-zero = true)
and `meta.json`. Masks are the one derived member: a set's own mask conventions (255 = non-occluded, 255 =
occluded, several files) are folded into one 0/255 PNG when the shard is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stereo.data.codecs import (
    DEPTH_CODECS,
    DISP_CODECS,
    MASK_CODECS,
    CodecError,
    decode_depth,
    decode_disp,
    decode_image,
    decode_mask,
    depth_to_disparity,
    encode_mask,
)

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


class BadSample(Exception):
    """A sample that cannot go into a shard; the writer reports `path` and `reason` and skips it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class MaskFile:
    path: str
    codec: str  # a key of codecs.MASK_CODECS: how this file marks the pixels that count


@dataclass(frozen=True)
class RawSample:
    """One stereo pair as it lies on disk in a public data set."""

    key: str  # unique within the data set; no dots (WebDataset splits member names at the first dot)
    source: str
    left: str
    right: str
    target: str  # ground-truth file: disparity, or depth when `kind` is "depth"
    codec: str  # key of codecs.DISP_CODECS or DEPTH_CODECS
    kind: str = "disp"
    target_right: str | None = None  # right-view ground truth in the same codec
    valid_masks: tuple[MaskFile, ...] = ()  # all must hold (besides finite, > 0)
    nocc_masks: tuple[MaskFile, ...] = ()  # all must hold for a pixel to count as non-occluded
    meta: dict[str, Any] = field(default_factory=dict)  # focal (px) and baseline (m) for depth sets, ...
    # negative disparity marks invalid pixels (users' files: -1 is a common marker) instead of being refused as a
    # sign or view mix-up, which it is in the public sets
    negative_invalid: bool = False

    def __post_init__(self) -> None:
        if "." in Path(self.key).name:
            raise ValueError(f"sample key {self.key!r} contains a dot; WebDataset keys must not")
        codecs = DISP_CODECS if self.kind == "disp" else DEPTH_CODECS if self.kind == "depth" else None
        if codecs is None or self.codec not in codecs:
            raise ValueError(f"{self.key}: unknown {self.kind} codec {self.codec!r}")
        for mask in self.valid_masks + self.nocc_masks:
            if mask.codec not in MASK_CODECS:
                raise ValueError(f"{self.key}: unknown mask codec {mask.codec!r} for {mask.path}")

    def files(self) -> list[str]:
        paths = [self.left, self.right, self.target] + [m.path for m in self.valid_masks + self.nocc_masks]
        return paths + ([self.target_right] if self.target_right else [])


def _image_ext(path: str) -> str:
    ext = IMAGE_EXTENSIONS.get(Path(path).suffix.lower())
    if ext is None:
        raise BadSample(path, f"expected a .jpg or .png image, got {Path(path).suffix!r}")
    return ext


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BadSample(path, f"cannot read: {exc.strerror or exc}") from exc


def _combined_mask(masks: tuple[MaskFile, ...]) -> bytes:
    """One 8-bit 0/255 PNG, whatever the files are (KITTI's `disp_noc` is a 16-bit disparity map, users' masks may
    be RGB): readers outside this code see the documented format."""
    combined = None
    for mask in masks:
        try:
            bits = decode_mask(_read(mask.path), mask.codec, mask.path)
        except CodecError as exc:
            raise BadSample(mask.path, str(exc)) from exc
        if combined is not None and bits.shape != combined.shape:
            raise BadSample(mask.path, f"mask is {bits.shape}, the other mask {combined.shape}")
        combined = bits if combined is None else combined & bits
    return encode_mask(combined)


def encode_raw(raw: RawSample) -> dict[str, bytes]:
    """The tar members of one sample (names without the key), from the files on disk."""
    members = {
        f"left.{_image_ext(raw.left)}": _read(raw.left),
        f"right.{_image_ext(raw.right)}": _read(raw.right),
        f"{raw.kind}.{raw.codec}": _read(raw.target),
    }
    if raw.target_right:
        members[f"{raw.kind}_right.{raw.codec}"] = _read(raw.target_right)
    if raw.valid_masks:
        members["valid.png"] = _combined_mask(raw.valid_masks)
    if raw.nocc_masks:
        members["nocc.png"] = _combined_mask(raw.nocc_masks)
    meta = {"source": raw.source, "path": raw.left, **raw.meta}
    members["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return members


def _find(members: dict[str, bytes], prefix: str) -> tuple[str, bytes] | None:
    for name, data in members.items():
        if name.startswith(prefix + "."):
            return name[len(prefix) + 1 :], data
    return None


def _ground_truth(members: dict[str, bytes], key: str, view: str, meta: dict) -> np.ndarray | None:
    """Raw disparity of one view (`disp` or `disp_right`), depth converted; None when absent."""
    depth_name = view.replace("disp", "depth")
    found = _find(members, view)
    if found is not None:
        return decode_disp(found[1], found[0], f"{key}.{view}.{found[0]}")
    found = _find(members, depth_name)
    if found is None:
        return None
    if "focal" not in meta or "baseline" not in meta:
        raise CodecError(f"{key}: {depth_name}.{found[0]} needs focal and baseline in meta.json, got {sorted(meta)}")
    depth = decode_depth(found[1], found[0], f"{key}.{depth_name}.{found[0]}")
    try:
        focal, baseline = float(meta["focal"]), float(meta["baseline"])
    except (TypeError, ValueError):
        raise CodecError(f"{key}.meta.json: focal and baseline must be numbers, got {meta['focal']!r}, "
                         f"{meta['baseline']!r}") from None
    return depth_to_disparity(depth, focal, baseline)


def _check_shape(key: str, what: str, array: np.ndarray, shape: tuple[int, int]) -> None:
    if array.shape[:2] != shape:
        raise CodecError(f"{key}: {what} is {array.shape[1]}x{array.shape[0]}, the left image {shape[1]}x{shape[0]}")


def decode_sample(members: dict[str, bytes], key: str) -> dict[str, Any]:
    """Members (extension -> bytes; `__key__`-style entries ignored) -> numpy sample (docs/architecture.md)."""
    try:
        meta = json.loads(members["meta.json"]) if "meta.json" in members else {}
    except ValueError as exc:
        raise CodecError(f"{key}.meta.json: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CodecError(f"{key}.meta.json: expected a JSON object, got {type(meta).__name__}")
    images = {}
    for view in ("left", "right"):
        found = _find(members, view)
        if found is None:
            raise CodecError(f"{key}: no {view}.jpg/{view}.png member (has {sorted(members)})")
        images[view] = decode_image(found[1], f"{key}.{view}.{found[0]}")
    shape = images["left"].shape[:2]
    _check_shape(key, "right image", images["right"], shape)

    raw = _ground_truth(members, key, "disp", meta)
    if raw is None:
        raise CodecError(f"{key}: no disp.<codec> or depth.<codec> member (has {sorted(members)})")
    _check_shape(key, "disparity", raw, shape)
    valid = np.isfinite(raw) & (raw > 0)
    if "valid.png" in members:
        mask = decode_mask(members["valid.png"], "nonzero", f"{key}.valid.png")
        _check_shape(key, "valid mask", mask, shape)
        valid &= mask
    nocc = None
    if "nocc.png" in members:
        nocc = decode_mask(members["nocc.png"], "nonzero", f"{key}.nocc.png")
        _check_shape(key, "nocc mask", nocc, shape)
        nocc &= valid

    raw_right = _ground_truth(members, key, "disp_right", meta)
    disp_right = None
    if raw_right is not None:
        _check_shape(key, "right disparity", raw_right, shape)
        np.copyto(raw_right, np.float32(0), where=~(np.isfinite(raw_right) & (raw_right > 0)))
        disp_right = raw_right

    np.copyto(raw, np.float32(0), where=~valid)  # in place: the codec's array is ours (a full-size copy is 15x slower)
    return {
        "key": key,
        "left": images["left"],
        "right": images["right"],
        "disp": raw,
        "valid": valid,
        "nocc": nocc,
        "disp_right": disp_right,
        "meta": meta,
    }


def check_members(members: dict[str, bytes], key: str, negative_invalid: bool = False) -> str | None:
    """Why a sample must not be trained on, or None: undecodable or mismatched sizes, negative disparity
    (a sign or view mix-up, unless `negative_invalid`: then it only marks invalid pixels), or no valid pixel."""
    try:
        sample = decode_sample(members, key)
        raw = _ground_truth(members, key, "disp", sample["meta"])
    except CodecError as exc:
        return str(exc)
    negative = 0 if negative_invalid else int(np.count_nonzero(np.isfinite(raw) & (raw < 0)))
    if negative:
        return f"{negative} pixels with negative disparity (min {float(np.nanmin(raw)):.3f})"
    if not sample["valid"].any():
        return "no valid disparity pixel"
    return None


def encode_checked(raw: RawSample) -> tuple[str, dict[str, bytes]]:
    """encode_raw plus a full decode and check: the `encode` the shard writer uses for raw data sets."""
    members = encode_raw(raw)
    reason = check_members(members, raw.key, raw.negative_invalid)
    if reason:
        raise BadSample(raw.left, reason)
    return raw.key, members


def load_raw(raw: RawSample) -> dict[str, Any]:
    """Decode a sample straight from its files (evaluation on raw directories); same dict as decode_sample."""
    return decode_sample(encode_raw(raw), raw.key)
