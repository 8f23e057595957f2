"""Tiny fake copies of the public stereo data sets, laid out exactly like the real ones.

Each `make_<set>(root)` writes 2-3 small pairs under `root` and returns a `FakeSet`: the folder to pass as the
source root (`--src`) and, per sample, the left image path with the disparity (px, 0 = invalid) and non-occlusion
mask the files encode, so tests can check what a reader returns. Benchmark tests reuse these trees.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from stereo.data.codecs import encode_fsd_png, encode_kitti_png, encode_png, write_pfm

H, W = 12, 20


@dataclass
class FakeSample:
    left: str
    disp: np.ndarray  # float32 px, 0 where invalid
    nocc: np.ndarray | None = None
    left_rgb: np.ndarray | None = None  # for PNG images (lossless): the exact pixels


@dataclass
class FakeSet:
    root: Path
    samples: list[FakeSample] = field(default_factory=list)

    def by_left(self) -> dict[str, FakeSample]:
        return {s.left: s for s in self.samples}


def _rng(path: Path) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(str(path).encode()))  # stable across processes, unlike hash()


def _images(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    left = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    return left, np.roll(left, -2, axis=1)


def _disp(rng: np.random.Generator, step: float = 1 / 32) -> np.ndarray:
    """Positive disparities on a grid of `step` px, so each encoding can hold them (almost) exactly."""
    return (np.round(rng.uniform(1.0, 40.0, (H, W)) / step) * step).astype(np.float32)


def _write_image(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        path.write_bytes(buf.tobytes())
    else:
        path.write_bytes(encode_png(rgb))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _pair(fake: FakeSet, left: Path, right: Path, disp: np.ndarray, nocc: np.ndarray | None = None) -> None:
    rng = _rng(left)
    left_rgb, right_rgb = _images(rng)
    _write_image(left, left_rgb)
    _write_image(right, right_rgb)
    fake.samples.append(FakeSample(str(left), disp, nocc, left_rgb if left.suffix == ".png" else None))


def _sparse(disp: np.ndarray, rng: np.random.Generator, fraction: float = 0.3) -> np.ndarray:
    out = disp.copy()
    out[rng.random(disp.shape) < fraction] = 0
    return out


def encode_u16(array: np.ndarray) -> bytes:
    return encode_png(np.clip(np.round(array), 0, 65535).astype(np.uint16))


def encode_sintel_png(disp: np.ndarray) -> bytes:
    """Sintel's packing: R = floor(d/4), G = floor((d*2^6) mod 2^8), B = floor((d*2^14) mod 2^8)."""
    r = np.floor(disp / 4.0)
    g = np.floor((disp * 2**6) % 2**8)
    b = np.floor((disp * 2**14) % 2**8)
    return encode_png(np.stack([r, g, b], axis=-1).astype(np.uint8))


def encode_mask(mask: np.ndarray, true: int = 255, false: int = 0) -> bytes:
    return encode_png(np.where(mask, true, false).astype(np.uint8))


# --- the data sets ----------------------------------------------------------------------------------------------


def make_sceneflow(root: Path) -> FakeSet:
    """FlyingThings3D TRAIN (2) + TEST (1), Driving (1), Monkaa (1); clean and final passes share disparities."""
    fake = FakeSet(root)
    frames = [
        ("FlyingThings3D", "TRAIN/A/0000", "0006"),
        ("FlyingThings3D", "TRAIN/B/0001", "0007"),
        ("FlyingThings3D", "TEST/A/0000", "0006"),
        ("Driving", "15mm_focallength/scene_backwards/fast", "0001"),
        ("Monkaa", "a_rain_of_stones_x2", "0000"),
    ]
    for subset, scene, frame in frames:
        base = root / subset
        disp = _disp(_rng(base / scene / frame))
        for view, d in (("left", disp), ("right", disp + 1)):
            write_pfm(_mkdir(base / "disparity" / scene / view) / f"{frame}.pfm", d)
        for pass_name in ("clean", "final"):
            folder = base / f"frames_{pass_name}pass" / scene
            _pair(fake, folder / "left" / f"{frame}.png", folder / "right" / f"{frame}.png", disp)
    return fake


def make_fsd(root: Path) -> FakeSet:
    fake = FakeSet(root)
    for scene, frame in (("manipulation_v5_realistic_kitchen_2500_1", "0000"),
                         ("manipulation_v5_realistic_kitchen_2500_1", "0001"), ("driving_v2_chaotic_3", "0000")):
        data = root / scene / "dataset" / "data"
        disp = _disp(_rng(data / frame), step=1 / 1000)
        _write(data / "left" / "disparity" / f"{frame}.png", encode_fsd_png(disp))
        _pair(fake, data / "left" / "rgb" / f"{frame}.jpg", data / "right" / "rgb" / f"{frame}.jpg", disp)
    return fake


def _kitti(root: Path, views: tuple[str, str], occ: str, noc: str) -> FakeSet:
    fake = FakeSet(root)
    training = root / "training"
    for index in range(3):
        name = f"{index:06d}_10.png"
        rng = _rng(training / name)
        disp = _sparse(_disp(rng, 1 / 256), rng)
        noc_disp = _sparse(disp, rng)
        _write(training / occ / name, encode_kitti_png(disp))
        _write(training / noc / name, encode_kitti_png(noc_disp))
        _pair(fake, training / views[0] / name, training / views[1] / name, disp, noc_disp > 0)
        _write_image(training / views[0] / f"{index:06d}_11.png", _images(rng)[0])  # the t+1 frame: not a pair
    _write_image(root / "testing" / views[0] / "000000_10.png", _images(_rng(root))[0])
    return fake


def make_kitti12(root: Path) -> FakeSet:
    return _kitti(root, ("colored_0", "colored_1"), "disp_occ", "disp_noc")


def make_kitti15(root: Path) -> FakeSet:
    return _kitti(root, ("image_2", "image_3"), "disp_occ_0", "disp_noc_0")


CALIB = "cam0=[1000.5 0 300; 0 1000.5 200; 0 0 1]\ncam1=[1000.5 0 320; 0 1000.5 200; 0 0 1]\ndoffs=20\n" \
        "baseline=193.001\nwidth=20\nheight=12\nndisp=64\n"


def _with_inf(disp: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The PFM content (inf = unknown) and the expected decoded disparity (0 there)."""
    unknown = rng.random(disp.shape) < 0.2
    return np.where(unknown, np.inf, disp).astype(np.float32), np.where(unknown, 0, disp).astype(np.float32)


def make_middlebury2014(root: Path) -> FakeSet:
    fake = FakeSet(root)
    for scene in ("Adirondack-perfect", "Motorcycle-imperfect"):
        folder = root / scene
        rng = _rng(folder)
        stored, expected = _with_inf(_disp(rng), rng)
        _write(folder / "calib.txt", CALIB.encode())
        write_pfm(folder / "disp0.pfm", stored)
        write_pfm(folder / "disp1.pfm", stored)
        _pair(fake, folder / "im0.png", folder / "im1.png", expected)
        _write_image(folder / "im1E.png", _images(rng)[1])
        _write_image(folder / "im1L.png", _images(rng)[1])
    return fake


def make_middeval3(root: Path, resolution: str = "F") -> FakeSet:
    fake = FakeSet(root)
    for scene in ("Adirondack", "Jadeplant"):
        folder = root / f"training{resolution}" / scene
        rng = _rng(folder)
        stored, expected = _with_inf(_disp(rng), rng)
        mask = rng.choice(np.array([0, 128, 255], np.uint8), (H, W))
        _write(folder / "calib.txt", CALIB.encode())
        write_pfm(folder / "disp0GT.pfm", stored)
        _write(folder / "mask0nocc.png", encode_png(mask))
        _pair(fake, folder / "im0.png", folder / "im1.png", expected, (mask == 255) & (expected > 0))
    _write_image(root / f"test{resolution}" / "Australia" / "im0.png", _images(_rng(root))[0])
    return fake


def make_eth3d(root: Path) -> FakeSet:
    fake = FakeSet(root)
    for scene in ("delivery_area_1l", "electro_1s"):
        rng = _rng(root / scene)
        stored, expected = _with_inf(_disp(rng), rng)
        nocc = rng.random((H, W)) < 0.7
        gt = root / "two_view_training_gt" / scene
        write_pfm(_mkdir(gt) / "disp0GT.pfm", stored)
        _write(gt / "mask0nocc.png", encode_mask(nocc))
        folder = root / "two_view_training" / scene
        _write(folder / "calib.txt", CALIB.encode())
        # ETH3D's images are 8-bit gray PNGs
        left, right = (_images(rng)[0][..., 0] for _ in range(2))
        _write(folder / "im0.png", encode_png(left))
        _write(folder / "im1.png", encode_png(right))
        fake.samples.append(FakeSample(str(folder / "im0.png"), expected, nocc & (expected > 0),
                                       np.repeat(left[..., None], 3, axis=2)))
    return fake


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_sintel(root: Path) -> FakeSet:
    """Sintel stereo: the tree under ROOT/training, both passes."""
    fake = FakeSet(root)
    training = root / "training"
    for scene, frame in (("alley_1", "frame_0001"), ("alley_1", "frame_0002"), ("bamboo_2", "frame_0001")):
        rng = _rng(training / scene / frame)
        disp = _disp(rng, 1 / 2**14)
        occ = rng.random((H, W)) < 0.2
        out = rng.random((H, W)) < 0.1
        _write(training / "disparities" / scene / f"{frame}.png", encode_sintel_png(disp))
        _write(training / "occlusions" / scene / f"{frame}.png", encode_mask(occ))
        _write(training / "outofframe" / scene / f"{frame}.png", encode_mask(out))
        for pass_name in ("clean", "final"):
            _pair(fake, training / f"{pass_name}_left" / scene / f"{frame}.png",
                  training / f"{pass_name}_right" / scene / f"{frame}.png", disp, ~occ & ~out)
    return fake


def make_crestereo(root: Path) -> FakeSet:
    fake = FakeSet(root)
    for subset, name in (("tree", "0a1b2c3d_0"), ("tree", "0a1b2c3d_1"), ("shapenet", "ffe3_12")):
        folder = root / subset
        disp = _disp(_rng(folder / name), 1 / 32)
        _write(folder / f"{name}_left.disp.png", encode_u16(disp * 32))
        _write(folder / f"{name}_right.disp.png", encode_u16(disp * 32))
        _pair(fake, folder / f"{name}_left.jpg", folder / f"{name}_right.jpg", disp)
    return fake


FAT_FX = 768.1605834960938


def make_fallingthings(root: Path) -> FakeSet:
    fake = FakeSet(root)
    settings = {"camera_settings": [
        {"name": "left", "intrinsic_settings": {"fx": FAT_FX, "fy": FAT_FX, "cx": 480, "cy": 270}},
        {"name": "right", "intrinsic_settings": {"fx": FAT_FX, "fy": FAT_FX, "cx": 480, "cy": 270}}]}
    for folder, frame in ((root / "mixed" / "kitchen_0", "000000"), (root / "mixed" / "kitchen_0", "000001"),
                          (root / "single" / "002_master_chef_can_16k" / "kitchen_0", "000000")):
        _write(folder / "_camera_settings.json", json.dumps(settings).encode())
        depth_units = _rng(folder / frame).integers(3000, 60000, (H, W)).astype(np.uint16)  # 0.1 mm
        _write(folder / f"{frame}.left.depth.png", encode_u16(depth_units))
        _write(folder / f"{frame}.right.depth.png", encode_u16(depth_units))
        disp = (FAT_FX * 0.06 / (depth_units.astype(np.float64) / 10000.0)).astype(np.float32)
        _pair(fake, folder / f"{frame}.left.jpg", folder / f"{frame}.right.jpg", disp)
    return fake


def make_instereo2k(root: Path) -> FakeSet:
    fake = FakeSet(root)
    for folder in (root / "train" / "part1" / "000000", root / "train" / "part2" / "000123", root / "test" / "000001"):
        rng = _rng(folder)
        disp = _sparse(_disp(rng, 1 / 100), rng, 0.1)
        _write(folder / "left_disp.png", encode_u16(disp * 100))
        _write(folder / "right_disp.png", encode_u16(disp * 100))
        _pair(fake, folder / "left.png", folder / "right.png", disp)
    return fake


VKITTI2_FOCAL, VKITTI2_BASELINE = 725.0087, 0.532725


def make_vkitti2(root: Path) -> FakeSet:
    fake = FakeSet(root)
    for scene, variant, frame in (("Scene01", "clone", "00000"), ("Scene01", "fog", "00000"),
                                  ("Scene02", "15-deg-left", "00007")):
        frames = root / scene / variant / "frames"
        rng = _rng(frames / frame)
        depth_cm = rng.integers(200, 30000, (H, W)).astype(np.uint16)
        depth_cm[:2] = 65535  # sky
        for camera in ("Camera_0", "Camera_1"):
            _write(frames / "depth" / camera / f"depth_{frame}.png", encode_u16(depth_cm))
        disp = np.where(depth_cm == 65535, 0, VKITTI2_FOCAL * VKITTI2_BASELINE / (depth_cm / 100.0))
        _pair(fake, frames / "rgb" / "Camera_0" / f"rgb_{frame}.jpg", frames / "rgb" / "Camera_1" / f"rgb_{frame}.jpg",
              disp.astype(np.float32))
    return fake


def make_generic(root: Path) -> FakeSet:
    """A list file `root/pairs.txt` with one PFM, one 16-bit PNG and one .npy pair (the last with a mask)."""
    fake = FakeSet(root / "pairs.txt")
    lines = ["# left right disparity [mask]"]
    for index, ext in enumerate((".pfm", ".png", ".npy")):
        rng = _rng(root / str(index))
        disp = _disp(rng, 1 / 256)
        name = f"pair{index}"
        if ext == ".pfm":
            write_pfm(_mkdir(root / "disp") / f"{name}.pfm", disp)
        elif ext == ".png":
            _write(root / "disp" / f"{name}.png", encode_kitti_png(disp))
        else:
            np.save(root / "disp" / f"{name}.npy", disp)
        line = f"images/{name}_L.png images/{name}_R.png disp/{name}{ext}"
        if ext == ".npy":
            valid = rng.random((H, W)) < 0.6
            _write(root / "masks" / f"{name}.png", encode_mask(valid))
            line += f" masks/{name}.png"
            disp = np.where(valid, disp, 0).astype(np.float32)
        lines.append(line)
        _pair(fake, root / "images" / f"{name}_L.png", root / "images" / f"{name}_R.png", disp)
    (root / "pairs.txt").write_text("\n".join(lines) + "\n\n")
    return fake


MAKERS = {
    "sceneflow": make_sceneflow, "fsd": make_fsd, "kitti12": make_kitti12, "kitti15": make_kitti15,
    "middlebury2014": make_middlebury2014, "middeval3": make_middeval3, "eth3d": make_eth3d, "sintel": make_sintel,
    "crestereo": make_crestereo, "fallingthings": make_fallingthings, "instereo2k": make_instereo2k,
    "vkitti2": make_vkitti2, "generic": make_generic,
}
