"""Inference: padding to multiples of 32 and back, `predict` on odd sizes, and the `infer` command's files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from stereo.cli import main
from stereo.config import Config, to_dict
from stereo.config.schema import ModelConfig
from stereo.data.codecs import decode_image, encode_png, read_pfm
from stereo.model import build_model
from stereo.model.infer import InputPadder, predict
from stereo.model.io import export_released


def test_padder_splits_evenly_and_unpads_exactly():
    padder = InputPadder(45, 70)
    assert padder.pad == (13, 13, 9, 10)  # width 70 -> 96, height 45 -> 64
    x = torch.arange(45 * 70, dtype=torch.float32).view(1, 1, 45, 70)
    padded = padder.pad_tensor(x)
    assert padded.shape == (1, 1, 64, 96)
    assert torch.equal(padded[..., 9, :13], x[..., 0, :1].expand(1, 1, 13))  # replicate, not zeros
    assert torch.equal(padder.unpad(padded), x)
    assert InputPadder(64, 96).pad == (0, 0, 0, 0)


def tiny_config() -> Config:
    cfg = Config()
    cfg.model = ModelConfig(size="tiny", max_disp=64, train_iters=2, valid_iters=2, hidden_dims=[32, 32, 32])
    return cfg


def test_predict_any_size_keeps_training_mode():
    torch.manual_seed(0)
    model = build_model(tiny_config().model)
    model.train()
    left = torch.rand(1, 3, 37, 61) * 255
    disp = predict(model, left, left.roll(-2, dims=3), iters=1)
    assert disp.shape == (1, 1, 37, 61) and disp.dtype == torch.float32 and torch.isfinite(disp).all()
    assert model.training
    with pytest.raises(ValueError, match="differ in shape"):
        predict(model, left, left[..., :60], iters=1)


@pytest.fixture(scope="module")
def checkpoint_and_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    cfg = tiny_config()
    torch.manual_seed(0)
    export_released(build_model(cfg.model), root / "tiny.pth", global_step=0, epoch=0, config=to_dict(cfg))
    rng = np.random.default_rng(0)
    left = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    (root / "left.png").write_bytes(encode_png(left))
    (root / "right.png").write_bytes(encode_png(np.roll(left, -3, axis=1)))
    (root / "small.png").write_bytes(encode_png(left[:32, :64]))
    return root


def test_infer_command_writes_disparity_and_depth(checkpoint_and_pair, capsys):
    root = checkpoint_and_pair
    out = root / "out"
    args = ["infer", "--ckpt", str(root / "tiny.pth"), "--left", str(root / "left.png"), "--right",
            str(root / "right.png"), "--out", str(out), "--iters", "2", "--device", "cpu",
            "--focal", "500", "--baseline", "0.1"]
    assert main(args) == 0
    disp = read_pfm(out / "disp.pfm")
    assert disp.shape == (40, 70) and np.isfinite(disp).all()
    assert f"disparity {disp.min():.2f} .. {disp.max():.2f} px" in capsys.readouterr().out
    png = decode_image((out / "disp_color.png").read_bytes())
    assert png.shape[1:] == (70, 3) and png.shape[0] > 40  # the colour bar's band below the picture
    import cv2

    sixteen = cv2.imread(str(out / "disp.png"), cv2.IMREAD_UNCHANGED)
    assert sixteen.dtype == np.uint16 and sixteen.shape == (40, 70)
    np.testing.assert_allclose(sixteen / 256.0, np.clip(disp, 0, None), atol=1 / 256)
    depth = read_pfm(out / "depth.pfm")
    positive = disp > 0
    np.testing.assert_allclose(depth[positive], 50.0 / disp[positive], rtol=1e-5)
    assert (depth[~positive] == 0).all()


def test_infer_command_errors(checkpoint_and_pair, capsys):
    root = checkpoint_and_pair
    base = ["infer", "--ckpt", str(root / "tiny.pth"), "--out", str(root / "bad"), "--device", "cpu"]
    assert main(base + ["--left", str(root / "missing.png"), "--right", str(root / "right.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(base + ["--left", str(root / "left.png"), "--right", str(root / "small.png")]) == 2
    err = capsys.readouterr().err
    assert "small.png" in err and "64x32" in err and "70x40" in err
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("not an image\n")
    for bad, why in (("empty.png", "empty (0 bytes)"), ("notes.png", "not a decodable JPEG/PNG image")):
        assert main(base + ["--left", str(root / "left.png"), "--right", str(root / bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"infer: {root / bad}: ") and why in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_hierarchical_inference_starts_from_the_half_resolution_pass(checkpoint_and_pair):
    """`--hierarchical` writes a full-size disparity that differs from the single pass (it starts elsewhere); the
    equality with the released `run_hierachical` is checked in test_released_equality.py."""
    root = checkpoint_and_pair
    args = ["infer", "--ckpt", str(root / "tiny.pth"), "--left", str(root / "left.png"), "--right",
            str(root / "right.png"), "--iters", "2", "--device", "cpu"]
    assert main(args + ["--out", str(root / "single")]) == 0
    assert main(args + ["--out", str(root / "hierarchical"), "--hierarchical"]) == 0
    single, hierarchical = read_pfm(root / "single" / "disp.pfm"), read_pfm(root / "hierarchical" / "disp.pfm")
    assert hierarchical.shape == (40, 70) and np.isfinite(hierarchical).all()
    assert np.abs(hierarchical - single).max() > 1e-3


def test_init_disp_of_the_wrong_shape_is_refused():
    torch.manual_seed(0)
    model = build_model(tiny_config().model).eval()
    left = torch.rand(1, 3, 32, 64) * 255
    with pytest.raises(ValueError, match=r"init_disp must be \(1, 1, 8, 16\).*got \(1, 1, 16, 32\)"):
        model(left, left, iters=1, test_mode=True, init_disp=torch.zeros(1, 1, 16, 32))


def test_infer_precision(checkpoint_and_pair, capsys):
    """bf16 autocast on the CPU gives fp32 disparities close to the fp32 run; fp16 is refused there (exit 2)."""
    root = checkpoint_and_pair
    args = ["infer", "--ckpt", str(root / "tiny.pth"), "--left", str(root / "left.png"), "--right",
            str(root / "right.png"), "--iters", "2", "--device", "cpu"]
    assert main(args + ["--out", str(root / "fp32")]) == 0
    assert "(fp32)" in capsys.readouterr().err  # auto is fp32 on the CPU
    assert main(args + ["--out", str(root / "bf16"), "--precision", "bf16"]) == 0
    fp32, bf16 = read_pfm(root / "fp32" / "disp.pfm"), read_pfm(root / "bf16" / "disp.pfm")
    assert bf16.dtype == np.float32 and 0 < np.abs(bf16 - fp32).max() < 0.05 * np.abs(fp32).max()
    assert main(args + ["--out", str(root / "fp16"), "--precision", "fp16"]) == 2
    assert "--precision: fp32 or bf16 on the CPU (fp16 needs a GPU)" in capsys.readouterr().err


def test_infer_names_a_missing_file_before_importing_torch(tmp_path):
    args = ["infer", "--ckpt", str(tmp_path), "--left", f"{tmp_path}/l.png", "--right", f"{tmp_path}/r.png",
            "--out", f"{tmp_path}/out"]
    script = f"import sys; from stereo.cli import main; code = main({args!r}); print(code, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert done.stderr.strip() == f"infer: --left {tmp_path}/l.png: no such file or directory"
