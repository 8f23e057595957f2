"""File formats of the public stereo data sets: images, disparity, depth and masks.

Every disparity/depth codec decodes the file's bytes to float32 in pixels (metres for depth) with the set's own
invalid marker turned into 0 (or left non-finite): callers treat non-finite and <= 0 as invalid. The codec name is
also the shard member extension (`disp.kitti.png`), so a shard says how to read each member.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

# The loader runs one decode per worker process; OpenCV's own thread pool would only oversubscribe the cores.
cv2.setNumThreads(1)


class CodecError(ValueError):
    """A file whose bytes do not follow the format its name promises."""


def _imdecode(data: bytes, flags: int, name: str, what: str) -> np.ndarray:
    """cv2.imdecode that fails only with CodecError naming the member: OpenCV returns None for most bad bytes but
    raises cv2.error for some (an empty buffer), which callers that skip bad samples would not catch."""
    if not data:
        raise CodecError(f"{name}: empty (0 bytes), expected a {what}")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as exc:
        raise CodecError(f"{name}: not a decodable {what} ({len(data)} bytes; OpenCV: {exc.err or exc})") from None
    if image is None:
        raise CodecError(f"{name}: not a decodable {what} ({len(data)} bytes)")
    return image


# --- images ---------------------------------------------------------------------------------------------------


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """JPEG/PNG bytes (gray, RGB, RGBA, 8 or 16 bit) -> (H, W, 3) uint8 RGB."""
    return _imdecode(data, cv2.IMREAD_COLOR_RGB, name, "JPEG/PNG image")  # RGB straight from the decoder


def read_image(path: str | Path) -> np.ndarray:
    return decode_image(Path(path).read_bytes(), str(path))


def _decode_unchanged(data: bytes, name: str, dtype: type, channels: int) -> np.ndarray:
    """PNG bytes exactly as stored (no colour conversion, 16 bit kept); checks dtype and channel count."""
    img = _imdecode(data, cv2.IMREAD_UNCHANGED, name, "PNG")
    got = 1 if img.ndim == 2 else img.shape[2]
    if img.dtype != dtype or got != channels:
        raise CodecError(f"{name}: expected a {channels}-channel {np.dtype(dtype).name} PNG, got {got}-channel "
                         f"{img.dtype.name}")
    return img


def encode_png(array: np.ndarray) -> bytes:
    """uint8/uint16 gray or RGB array -> PNG bytes (RGB order in, as everywhere in this package)."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise CodecError(f"cannot encode a {array.dtype} array of shape {array.shape} as PNG")
    return buf.tobytes()


# --- PFM ------------------------------------------------------------------------------------------------------

_PFM_HEADER = re.compile(rb"^(P[Ff])\s+(\d+)\s+(\d+)\s+([-+0-9.eE]+)\s")


def decode_pfm(data: bytes, name: str = "pfm") -> np.ndarray:
    """PFM bytes -> float32 (H, W) for `Pf` or (H, W, 3) for `PF`, rows top-down.

    The scale's sign gives the byte order (negative = little-endian); PFM stores rows bottom-up.
    """
    match = _PFM_HEADER.match(data[:256])
    if not match:
        raise CodecError(f"{name}: not a PFM file (expected a 'Pf'/'PF' header, got {data[:16]!r})")
    kind, width, height, scale = match.group(1), int(match.group(2)), int(match.group(3)), float(match.group(4))
    channels = 3 if kind == b"PF" else 1
    dtype = np.dtype("<f4" if scale < 0 else ">f4")
    count = width * height * channels
    start = match.end()
    if len(data) - start < count * 4:
        raise CodecError(f"{name}: PFM {width}x{height}x{channels} needs {count * 4} bytes, has {len(data) - start}")
    pixels = np.frombuffer(data, dtype, count, start).astype(np.float32)
    shape = (height, width, channels) if channels == 3 else (height, width)
    return np.ascontiguousarray(pixels.reshape(shape)[::-1])


def encode_pfm(array: np.ndarray) -> bytes:
    """float array (H, W) or (H, W, 3), rows top-down -> little-endian PFM bytes."""
    array = np.asarray(array, np.float32)
    if array.ndim == 2:
        kind = b"Pf"
    elif array.ndim == 3 and array.shape[2] == 3:
        kind = b"PF"
    else:
        raise CodecError(f"PFM holds (H, W) or (H, W, 3) arrays, got shape {array.shape}")
    header = b"%s\n%d %d\n-1.0\n" % (kind, array.shape[1], array.shape[0])
    return header + np.ascontiguousarray(array[::-1]).astype("<f4").tobytes()


def read_pfm(path: str | Path) -> np.ndarray:
    return decode_pfm(Path(path).read_bytes(), str(path))


def write_pfm(path: str | Path, array: np.ndarray) -> None:
    Path(path).write_bytes(encode_pfm(array))


# --- disparity encodings --------------------------------------------------------------------------------------


def _pfm_disp(data: bytes, name: str) -> np.ndarray:
    disp = decode_pfm(data, name)
    if disp.ndim == 3:  # some writers store gray maps as 3 equal channels
        disp = disp[..., 0]
    return disp


def _kitti_disp(data: bytes, name: str) -> np.ndarray:
    """KITTI / generic 16-bit PNG: value / 256, 0 = no ground truth."""
    return _decode_unchanged(data, name, np.uint16, 1).astype(np.float32) / 256.0


# weights of the B, G, R channels as OpenCV decodes them
_FSD_WEIGHTS = np.array([1.0, 255.0, 255.0 * 255.0], np.float32) / np.float32(1000.0)
_SINTEL_WEIGHTS = np.array([1.0 / 16384.0, 1.0 / 64.0, 4.0], np.float32)


def _fsd_disp(data: bytes, name: str) -> np.ndarray:
    """FSD: RGB uint8, disparity = (R*255*255 + G*255 + B) / 1000 (base 255, milli-pixels)."""
    bgr = _decode_unchanged(data, name, np.uint8, 3)
    return bgr.astype(np.float32) @ _FSD_WEIGHTS  # a matrix product is ~3x faster than the per-channel sum


def _sintel_disp(data: bytes, name: str) -> np.ndarray:
    """MPI Sintel stereo: RGB uint8, disparity = R*4 + G/2^6 + B/2^14."""
    bgr = _decode_unchanged(data, name, np.uint8, 3)
    return bgr.astype(np.float32) @ _SINTEL_WEIGHTS


def _crestereo_disp(data: bytes, name: str) -> np.ndarray:
    """CREStereo synthetic set: uint16 PNG, value / 32."""
    return _decode_unchanged(data, name, np.uint16, 1).astype(np.float32) / 32.0


def _instereo2k_disp(data: bytes, name: str) -> np.ndarray:
    """InStereo2K: uint16 PNG, value / 100, 0 = invalid (the set's README)."""
    return _decode_unchanged(data, name, np.uint16, 1).astype(np.float32) / 100.0


def _npy_f32(data: bytes, name: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:  # an empty member is an EOFError
        raise CodecError(f"{name}: not a .npy array ({exc})") from exc
    if array.ndim != 2:
        raise CodecError(f"{name}: expected a 2-D array, got shape {array.shape}")
    return array.astype(np.float32)


def _vkitti2_depth(data: bytes, name: str) -> np.ndarray:
    """Virtual KITTI 2: uint16 PNG depth in centimetres; 65535 (655.35 m) marks the sky -> invalid."""
    raw = _decode_unchanged(data, name, np.uint16, 1)
    depth = raw.astype(np.float32) / 100.0
    depth[raw == 65535] = 0.0
    return depth


def _fallingthings_depth(data: bytes, name: str) -> np.ndarray:
    """FallingThings: uint16 PNG depth in units of 0.1 mm (10000 = 1 m)."""
    return _decode_unchanged(data, name, np.uint16, 1).astype(np.float32) / 10000.0


Decoder = Callable[[bytes, str], np.ndarray]

DISP_CODECS: dict[str, Decoder] = {
    "pfm": _pfm_disp,
    "kitti.png": _kitti_disp,
    "fsd.png": _fsd_disp,
    "sintel.png": _sintel_disp,
    "crestereo.png": _crestereo_disp,
    "instereo2k.png": _instereo2k_disp,
    "f32.npy": _npy_f32,
}

DEPTH_CODECS: dict[str, Decoder] = {
    "vkitti2.png": _vkitti2_depth,
    "fallingthings.png": _fallingthings_depth,
    "f32.npy": _npy_f32,  # metres
}


def decode_disp(data: bytes, codec: str, name: str = "disparity") -> np.ndarray:
    if codec not in DISP_CODECS:
        raise CodecError(f"{name}: unknown disparity codec {codec!r} (known: {', '.join(DISP_CODECS)})")
    return DISP_CODECS[codec](data, name)


def decode_depth(data: bytes, codec: str, name: str = "depth") -> np.ndarray:
    if codec not in DEPTH_CODECS:
        raise CodecError(f"{name}: unknown depth codec {codec!r} (known: {', '.join(DEPTH_CODECS)})")
    return DEPTH_CODECS[codec](data, name)


def depth_to_disparity(depth: np.ndarray, focal_px: float, baseline_m: float) -> np.ndarray:
    """disparity = focal * baseline / depth; 0 where the depth is missing (<= 0 or non-finite)."""
    good = np.isfinite(depth) & (depth > 0)
    disp = np.zeros(depth.shape, np.float32)
    disp[good] = np.float32(focal_px * baseline_m) / depth[good]
    return disp


def encode_kitti_png(disp: np.ndarray) -> bytes:
    """Disparity in pixels -> KITTI 16-bit PNG (x256, 0 = invalid); values are rounded to 1/256 px."""
    good = np.isfinite(disp) & (disp > 0)
    raw = np.zeros(disp.shape, np.uint16)
    raw[good] = np.clip(np.round(disp[good] * 256.0), 1, 65535).astype(np.uint16)
    return encode_png(raw)


def encode_fsd_png(disp: np.ndarray) -> bytes:
    """Disparity in pixels -> FSD's packed RGB PNG (milli-pixels in base 255; 0 = invalid)."""
    good = np.isfinite(disp) & (disp > 0)
    milli = np.zeros(disp.shape, np.int64)
    milli[good] = np.clip(np.round(disp[good] * 1000.0), 0, 255**3 - 1).astype(np.int64)
    rgb = np.stack([milli // (255 * 255), (milli // 255) % 255, milli % 255], axis=-1).astype(np.uint8)
    return encode_png(rgb)


# --- masks ----------------------------------------------------------------------------------------------------

MASK_CODECS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "nonzero": lambda m: m != 0,  # our own valid.png / nocc.png members
    "eq255": lambda m: m == 255,  # Middlebury/ETH3D mask0nocc.png: 255 = non-occluded (128 = occluded)
    "zero": lambda m: m == 0,  # Sintel occlusions/outofframe: 255 marks the excluded pixels
}


def decode_mask(data: bytes, codec: str = "nonzero", name: str = "mask") -> np.ndarray:
    """8-bit PNG mask -> bool (H, W) under the named convention."""
    if codec not in MASK_CODECS:
        raise CodecError(f"{name}: unknown mask codec {codec!r} (known: {', '.join(MASK_CODECS)})")
    img = _imdecode(data, cv2.IMREAD_UNCHANGED, name, "PNG mask")
    if img.ndim == 3:  # some masks are saved as RGB(A) with equal channels
        img = img[..., 0]
    return MASK_CODECS[codec](img)


def encode_mask(mask: np.ndarray) -> bytes:
    """bool (H, W) -> 8-bit PNG, 255 where true."""
    return encode_png(np.where(mask, 255, 0).astype(np.uint8))
