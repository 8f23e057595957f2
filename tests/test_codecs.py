"""Codecs on real-format bytes: hand-made byte-level fixtures and files written by the sets' own conventions."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from fakedata import encode_sintel_png
from stereo.data.codecs import (
    CodecError,
    decode_depth,
    decode_disp,
    decode_image,
    decode_mask,
    decode_pfm,
    depth_to_disparity,
    encode_fsd_png,
    encode_kitti_png,
    encode_png,
    read_pfm,
    write_pfm,
)
from stereo.data.sample import decode_sample


def png_bytes(array: np.ndarray) -> bytes:
    """Written by OpenCV directly (BGR order for colour), the way the data sets' tools write them."""
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


# --- PFM ------------------------------------------------------------------------------------------------------


def test_pfm_big_endian_rows_bottom_up():
    # 2 rows x 3 columns; file order is the bottom row first; positive scale = big-endian
    data = b"Pf\n3 2\n1.0\n" + struct.pack(">6f", 4, 5, 6, 1, 2, 3)
    np.testing.assert_array_equal(decode_pfm(data), [[1, 2, 3], [4, 5, 6]])


def test_pfm_little_endian_and_color():
    data = b"Pf\n2 1\n-1.0\n" + struct.pack("<2f", 1.5, np.inf)
    out = decode_pfm(data)
    assert out.dtype == np.float32 and out[0, 0] == 1.5 and np.isinf(out[0, 1])
    color = b"PF\n1 2\n-0.5\n" + struct.pack("<6f", 4, 5, 6, 1, 2, 3)
    np.testing.assert_array_equal(decode_pfm(color), [[[1, 2, 3]], [[4, 5, 6]]])


def test_pfm_write_read_roundtrip(tmp_path: Path):
    disp = np.random.default_rng(0).uniform(-5, 300, (7, 11)).astype(np.float32)
    disp[0, 0] = np.inf
    write_pfm(tmp_path / "d.pfm", disp)
    raw = (tmp_path / "d.pfm").read_bytes()
    assert raw.startswith(b"Pf\n11 7\n-1.0\n")
    # first stored row is the image's bottom row, little-endian
    assert np.frombuffer(raw[len(b"Pf\n11 7\n-1.0\n"):][:44], "<f4").tolist() == disp[-1].tolist()
    np.testing.assert_array_equal(read_pfm(tmp_path / "d.pfm"), disp)


def test_pfm_bad_bytes_are_named():
    with pytest.raises(CodecError, match="x.pfm: not a PFM"):
        decode_pfm(b"P6\n1 1\n255\n\0\0\0", "x.pfm")
    with pytest.raises(CodecError, match="needs 24 bytes, has 4"):
        decode_pfm(b"Pf\n3 2\n-1.0\n" + b"\0" * 4)


# --- packed and scaled disparity PNGs ---------------------------------------------------------------------------


def test_kitti_png_scale_and_invalid():
    raw = np.array([[0, 256, 513]], np.uint16)
    out = decode_disp(png_bytes(raw), "kitti.png")
    np.testing.assert_array_equal(out, [[0, 1, 513 / 256]])
    disp = np.array([[0, np.nan, 2.5, 100.25]], np.float32)
    np.testing.assert_array_equal(decode_disp(encode_kitti_png(disp), "kitti.png"), [[0, 0, 2.5, 100.25]])


def test_kitti_png_must_be_16_bit():
    with pytest.raises(CodecError, match="expected a 1-channel uint16 PNG, got 1-channel uint8"):
        decode_disp(png_bytes(np.zeros((2, 2), np.uint8)), "kitti.png", "000000_10.png")


def test_fsd_packing_is_base_255():
    rgb = np.array([[[1, 2, 3], [0, 1, 0]]], np.uint8)
    out = decode_disp(png_bytes(rgb[..., ::-1].copy()), "fsd.png")  # OpenCV writes BGR
    np.testing.assert_allclose(out, [[(255 * 255 + 2 * 255 + 3) / 1000, 0.255]], rtol=1e-6)
    disp = np.array([[0.001, 65.538, 300.123]], np.float32)
    np.testing.assert_allclose(decode_disp(encode_fsd_png(disp), "fsd.png"), disp, atol=2e-5)


def test_sintel_packing():
    rgb = np.array([[[2, 64, 128]]], np.uint8)
    out = decode_disp(png_bytes(rgb[..., ::-1].copy()), "sintel.png")
    assert out[0, 0] == pytest.approx(2 * 4 + 64 / 64 + 128 / 2**14)
    disp = np.array([[0.5, 12.25 + 3 / 2**14, 511.0]], np.float32)
    np.testing.assert_array_equal(decode_disp(encode_sintel_png(disp), "sintel.png"), disp)


def test_crestereo_and_instereo2k_scales():
    raw = png_bytes(np.array([[0, 64, 250]], np.uint16))
    np.testing.assert_array_equal(decode_disp(raw, "crestereo.png"), [[0, 2, 250 / 32]])
    np.testing.assert_allclose(decode_disp(raw, "instereo2k.png"), [[0, 0.64, 2.5]])


def test_npy_disparity():
    import io
    buf = io.BytesIO()
    np.save(buf, np.array([[1.5, -1]], np.float64))
    np.testing.assert_array_equal(decode_disp(buf.getvalue(), "f32.npy"), [[1.5, -1]])
    with pytest.raises(CodecError, match="unknown disparity codec 'exr'"):
        decode_disp(b"", "exr")


# --- depth sets -------------------------------------------------------------------------------------------------


def test_vkitti2_depth_in_cm_and_sky():
    raw = png_bytes(np.array([[100, 2500, 65535, 0]], np.uint16))
    depth = decode_depth(raw, "vkitti2.png")
    np.testing.assert_allclose(depth, [[1.0, 25.0, 0, 0]])
    disp = depth_to_disparity(depth, 725.0087, 0.532725)
    np.testing.assert_allclose(disp, [[725.0087 * 0.532725, 725.0087 * 0.532725 / 25, 0, 0]], rtol=1e-6)


def test_fallingthings_depth_in_tenth_millimetres():
    raw = png_bytes(np.array([[10000, 5000]], np.uint16))
    depth = decode_depth(raw, "fallingthings.png")
    np.testing.assert_allclose(depth, [[1.0, 0.5]])
    # the usual reader's formula: disparity = fx * 6 cm * 100 / raw value
    np.testing.assert_allclose(depth_to_disparity(depth, 768.16, 0.06), [[768.16 * 600 / 10000, 768.16 * 600 / 5000]],
                               rtol=1e-6)


# --- masks and images -------------------------------------------------------------------------------------------


def test_mask_conventions():
    raw = png_bytes(np.array([[0, 128, 255]], np.uint8))
    np.testing.assert_array_equal(decode_mask(raw, "eq255"), [[False, False, True]])  # MiddEval3: 128 = occluded
    np.testing.assert_array_equal(decode_mask(raw, "nonzero"), [[False, True, True]])
    np.testing.assert_array_equal(decode_mask(raw, "zero"), [[True, False, False]])  # Sintel: 255 = excluded


def test_images_decode_to_rgb_uint8():
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 2] = 200  # red, in OpenCV's channel order
    for ext in (".png", ".jpg"):
        ok, buf = cv2.imencode(ext, bgr)
        rgb = decode_image(buf.tobytes())
        assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
        assert rgb[..., 0].min() > 190 and rgb[..., 2].max() < 10
    gray = decode_image(png_bytes(np.full((3, 2), 77, np.uint8)))
    assert gray.shape == (3, 2, 3) and (gray == 77).all()
    rgba = decode_image(png_bytes(np.dstack([bgr, np.full((4, 5), 9, np.uint8)])))
    assert rgba.shape == (4, 5, 3) and (rgba[..., 0] == 200).all()
    with pytest.raises(CodecError, match="left.jpg: not a decodable"):
        decode_image(b"not an image", "left.jpg")


# --- decode_sample ----------------------------------------------------------------------------------------------


def _members(disp: np.ndarray, **extra: bytes) -> dict[str, bytes]:
    image = encode_png(np.zeros(disp.shape + (3,), np.uint8))
    return {"left.png": image, "right.png": image, "disp.kitti.png": encode_kitti_png(disp), **extra}


def test_decode_sample_fields_and_masks():
    disp = np.array([[0, 1, 2], [3, 4, 5]], np.float32)
    valid = png_bytes(np.array([[255, 255, 0], [255, 255, 255]], np.uint8))
    nocc = png_bytes(np.array([[255, 0, 255], [255, 255, 0]], np.uint8))
    meta = json.dumps({"source": "x", "path": "p"}).encode()
    sample = decode_sample(_members(disp, **{"valid.png": valid, "nocc.png": nocc, "meta.json": meta,
                                             "__key__": b"k"}), "k")
    assert sample["key"] == "k" and sample["meta"] == {"source": "x", "path": "p"}
    np.testing.assert_array_equal(sample["valid"], [[False, True, False], [True, True, True]])
    np.testing.assert_array_equal(sample["disp"], [[0, 1, 0], [3, 4, 5]])
    np.testing.assert_array_equal(sample["nocc"], [[False, False, False], [True, True, False]])
    assert sample["disp_right"] is None


def test_decode_sample_depth_needs_intrinsics():
    depth_png = png_bytes(np.array([[100, 200]], np.uint16))
    image = encode_png(np.zeros((1, 2, 3), np.uint8))
    members = {"left.png": image, "right.png": image, "depth.vkitti2.png": depth_png}
    with pytest.raises(CodecError, match="k: depth.vkitti2.png needs focal and baseline"):
        decode_sample(members, "k")
    members["meta.json"] = json.dumps({"focal": 100.0, "baseline": 0.5}).encode()
    np.testing.assert_allclose(decode_sample(members, "k")["disp"], [[50, 25]])


def test_decode_sample_errors_name_the_key():
    disp = np.ones((2, 3), np.float32)
    members = _members(disp)
    members["right.png"] = encode_png(np.zeros((2, 4, 3), np.uint8))
    with pytest.raises(CodecError, match="s1: right image is 4x2, the left image 3x2"):
        decode_sample(members, "s1")
    members = _members(disp)
    del members["disp.kitti.png"]
    with pytest.raises(CodecError, match="s2: no disp.<codec> or depth.<codec> member"):
        decode_sample(members, "s2")


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n truncated", b"not an image at all"])
def test_every_codec_fails_with_a_codec_error_naming_the_member(data: bytes):
    """OpenCV raises cv2.error (not None) for an empty buffer; the stream skips only CodecError/ValueError."""
    from stereo.data.codecs import DEPTH_CODECS, DISP_CODECS

    for codec in DISP_CODECS:
        with pytest.raises(CodecError, match=f"k.disp.{codec}: "):
            decode_disp(data, codec, f"k.disp.{codec}")
    for codec in DEPTH_CODECS:
        with pytest.raises(CodecError, match=f"k.depth.{codec}: "):
            decode_depth(data, codec, f"k.depth.{codec}")
    with pytest.raises(CodecError, match="k.left.png: "):
        decode_image(data, "k.left.png")
    with pytest.raises(CodecError, match="k.nocc.png: "):
        decode_mask(data, "nonzero", "k.nocc.png")
    members = {**_members(np.ones((2, 3), np.float32)), "left.png": data}
    with pytest.raises(CodecError, match="s3.left.png: "):
        decode_sample(members, "s3")
    members = {**_members(np.ones((2, 3), np.float32)), "meta.json": data}
    with pytest.raises(CodecError, match="s4.meta.json: "):
        decode_sample(members, "s4")
