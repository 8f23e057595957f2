"""The `metrics` and `eval` commands end to end, on real files."""

import json

import numpy as np
import pytest

from stereo.cli import main
from stereo.data.codecs import encode_kitti_png, encode_mask, write_pfm

# Errors 0.5, 4, 0 on gt 10, 20, 40; the gt-0 pixel and (in PFM) the inf pixel are not evaluated.
GT = np.array([[10.0, 20.0], [0.0, 40.0]], np.float32)
PRED = np.array([[10.5, 24.0], [3.0, 40.0]], np.float32)


def _metrics_json(capsys, *argv):
    assert main(["metrics", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


def test_metrics_cli_on_pfm(tmp_path, capsys):
    gt = GT.copy()
    gt[1, 0] = np.inf
    write_pfm(tmp_path / "gt.pfm", gt)
    write_pfm(tmp_path / "pred.pfm", PRED)
    values = _metrics_json(capsys, "--pred", tmp_path / "pred.pfm", "--gt", tmp_path / "gt.pfm")
    assert values["pixels"] == 3
    assert values["epe"] == pytest.approx(4.5 / 3)
    assert values["d1"] == pytest.approx(100 / 3)
    assert values["bp_0.5"] == pytest.approx(100 / 3)
    assert values["epe_noc"] is None


def test_metrics_cli_on_kitti_png_with_masks(tmp_path, capsys):
    (tmp_path / "gt.png").write_bytes(encode_kitti_png(GT))
    (tmp_path / "pred.png").write_bytes(encode_kitti_png(PRED))
    (tmp_path / "valid.png").write_bytes(encode_mask(np.array([[1, 1], [1, 0]], bool)))
    (tmp_path / "nocc.png").write_bytes(encode_mask(np.array([[1, 0], [1, 1]], bool)))
    values = _metrics_json(capsys, "--pred", tmp_path / "pred.png", "--gt", tmp_path / "gt.png",
                           "--mask", tmp_path / "valid.png", "--nocc", tmp_path / "nocc.png")
    # the mask admits the gt-0 pixel (error 3) and drops gt 40: errors 0.5, 4, 3
    assert values["pixels"] == 3
    assert values["epe"] == pytest.approx(7.5 / 3)
    assert values["bp_2"] == pytest.approx(200 / 3)
    assert values["pixels_noc"] == 2  # gt 10 (error 0.5) and gt 0 (error 3)
    assert values["epe_noc"] == pytest.approx(1.75)
    assert values["d1_noc"] == pytest.approx(0.0)  # 3 px is not > 3 px


def test_metrics_cli_names_bad_files(tmp_path, capsys):
    (tmp_path / "gt.png").write_bytes(encode_mask(GT > 0))  # an 8-bit PNG where 16 bit is expected
    write_pfm(tmp_path / "pred.pfm", PRED)
    assert main(["metrics", "--pred", str(tmp_path / "pred.pfm"), "--gt", str(tmp_path / "gt.png")]) == 1
    err = capsys.readouterr().err
    assert "gt.png" in err and "uint16" in err
    write_pfm(tmp_path / "small.pfm", PRED[:1])
    assert main(["metrics", "--pred", str(tmp_path / "small.pfm"), "--gt", str(tmp_path / "pred.pfm")]) == 1
    assert "small.pfm" in capsys.readouterr().err


def test_disparity_panel_shares_one_colour_scale_and_blacks_out_invalid():
    from stereo.pictures import disparity_tiles

    gt = np.tile(np.linspace(1, 50, 8, dtype=np.float32), (4, 1))
    valid = np.ones_like(gt, bool)
    valid[0, 0] = False
    pred = gt.copy()
    pred[3, 7] += 10  # one wrong pixel
    left_chw = np.full((3, 4, 8), 100.0, np.float32)  # the trainer passes CHW float tensors' numpy
    panel, vmin, vmax = disparity_tiles(left_chw, gt, pred[None], valid[None])
    assert panel.shape == (4, 32, 3) and panel.dtype == np.uint8
    assert 1 <= vmin < vmax <= 50
    left, gt_rgb, pred_rgb, err_rgb = np.split(panel, 4, axis=1)
    assert (left == 100).all()
    assert (gt_rgb[0, 0] == 0).all() and (err_rgb[0, 0] == 0).all()  # no ground truth: black
    same = valid.copy()
    same[3, 7] = False
    assert (gt_rgb[same] == pred_rgb[same]).all()  # equal values, equal colours
    assert len(np.unique(gt_rgb[same], axis=0)) == 8  # the scale spreads the 8 distinct values
    assert not (err_rgb[3, 7] == err_rgb[2, 7]).all()  # the wrong pixel stands out in the error map


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A tiny model exported the way `python -m stereo export` does, with its config embedded."""
    import torch

    from stereo.config.load import load_config, to_dict
    from stereo.model import build_model
    from stereo.model.io import export_released

    torch.manual_seed(0)
    cfg = load_config("tiny")
    folder = tmp_path_factory.mktemp("ckpt")
    export_released(build_model(cfg.model), folder / "demo.pth", global_step=0, epoch=0, config=to_dict(cfg))
    # released layout: no config inside, the released cfg.yaml beside it
    export_released(build_model(cfg.model), folder / "released" / "model_best_bp2.pth", global_step=0, epoch=0)
    # a bare file: no config inside or beside it
    export_released(build_model(cfg.model), folder / "bare" / "bare.pth", global_step=0, epoch=0)
    (folder / "bare" / "cfg.yaml").unlink()
    return folder


def test_eval_cli_writes_json_table_and_pictures(tmp_path, demo_checkpoint, capsys):
    import fakedata
    from PIL import Image

    fake = fakedata.make_kitti15(tmp_path / "kitti")
    out = tmp_path / "out"
    argv = ["eval", "--ckpt", str(demo_checkpoint / "demo.pth"), "--bench", "kitti15", "--data", str(fake.root),
            "--iters", "1", "--out", str(out), "--device", "cpu", "--limit", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "d1/pooled" in printed and "2.8" in printed  # the headline and the paper's number
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == "kitti15" and results["iters"] == 1 and results["model"] == "tiny"
    assert results["summary"]["images"] == 2 and len(results["images"]) == 2
    assert 0.0 <= results["summary"]["d1/pooled"] <= 100.0
    table = (out / "results.md").read_text()
    assert "| d1/pooled (%) |" in table and "| epe/pooled (px) |" in table and "000001_10" in table
    panels = sorted((out / "images").glob("*.png"))
    assert len(panels) == 2
    with Image.open(panels[0]) as panel:  # left | gt | prediction | error, with headers and colour bars
        assert panel.width == 4 * fakedata.W and panel.height > fakedata.H + 24
    with Image.open(out / "summary.png") as sheet:
        assert sheet.width == 1280 and sheet.height > 2 * 1280 * fakedata.H // (4 * fakedata.W)


def test_eval_cli_needs_a_config_for_a_bare_checkpoint(tmp_path, demo_checkpoint, capsys):
    import fakedata

    fake = fakedata.make_eth3d(tmp_path / "eth3d")
    argv = ["eval", "--ckpt", str(demo_checkpoint / "bare" / "bare.pth"), "--bench", "eth3d", "--data", str(fake.root),
            "--iters", "1", "--out", str(tmp_path / "out"), "--device", "cpu", "--no-images"]
    assert main(argv) == 2
    assert "--config" in capsys.readouterr().err
    assert main(argv + ["--size", "tiny"]) == 1  # released defaults for tiny have other widths than configs/tiny
    assert "bare.pth into a tiny model" in capsys.readouterr().err  # names the file and the keys that differ
    assert main(argv + ["--config", "tiny", "--limit", "1"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["summary"]["bp_1_noc/mean_image"] is not None
    assert not (tmp_path / "out" / "images").exists()


def test_eval_cli_reads_the_released_cfg_yaml_beside_a_checkpoint(tmp_path, demo_checkpoint, capsys):
    """The released folder layout (model_best_bp2.pth + cfg.yaml) needs neither --config nor --size."""
    import fakedata

    fake = fakedata.make_eth3d(tmp_path / "eth3d")
    ckpt = demo_checkpoint / "released" / "model_best_bp2.pth"
    argv = ["eval", "--ckpt", str(ckpt), "--bench", "eth3d", "--data", str(fake.root), "--iters", "1",
            "--out", str(tmp_path / "out"), "--device", "cpu", "--no-images", "--limit", "1"]
    assert main(argv) == 0
    assert main(argv + ["--size", "vitl"]) == 2  # contradicts cfg.yaml's vit_size
    assert "vitl" in capsys.readouterr().err
    released_cfg = ckpt.parent / "cfg.yaml"
    released_cfg.write_text(released_cfg.read_text().replace("n_gru_layers: 3", "n_gru_layers: 2"))
    try:
        assert main(argv) == 2
        assert f"{released_cfg}: n_gru_layers: 3 (the released architecture), got 2" in capsys.readouterr().err
    finally:
        released_cfg.write_text(released_cfg.read_text().replace("n_gru_layers: 2", "n_gru_layers: 3"))
