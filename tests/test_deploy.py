"""Deployment: ONNX export from each kind of source, parity with PyTorch at several sizes (736x1280, a size that is not
a multiple of 32, the Middlebury motorcycle pair), the fp16 variant, `infer --engine onnx`, the engine check script
and the inference memory plan. Models are exported once per module (an export takes a minute on two cores)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from stereo.cli import main
from stereo.config import Config, to_dict
from stereo.config.schema import ModelConfig
from stereo.data.codecs import decode_image, encode_png, read_pfm
from stereo.deploy import check_engine
from stereo.deploy.graph import DisparityGraph, padded_predict
from stereo.deploy.onnx_export import ExportError, ExportSpec, export_onnx, read_sidecar
from stereo.deploy.parity import difference
from stereo.deploy.reference import motorcycle, reference_pair
from stereo.deploy.runtime import OnnxStereo
from stereo.model import build_model
from stereo.model.infer import predict
from stereo.model.io import export_released

ITERS = 4
# Measured (docs/deploy.md): onnxruntime fp32 vs PyTorch fp32 on the CPU, random weights, 4 iterations.
MAX_ABS_PX = 1e-3
MEAN_ABS_PX = 1e-4


def seeded(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(cfg).eval()


def tiny_cfg() -> ModelConfig:
    return ModelConfig(size="tiny", max_disp=64, hidden_dims=[32, 32, 32], valid_iters=ITERS)


def torch_disparity(model, left: np.ndarray, right: np.ndarray, iters: int = ITERS) -> np.ndarray:
    tensors = [torch.from_numpy(x.copy()).permute(2, 0, 1)[None].float() for x in (left, right)]
    return predict(model, *tensors, iters)[0, 0].numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model exported through the CLI from one of our .pth exports (config embedded)."""
    root = tmp_path_factory.mktemp("deploy_tiny")
    cfg = Config()
    cfg.model = tiny_cfg()
    model = seeded(cfg.model)
    export_released(model, root / "tiny.pth", global_step=0, epoch=0, config=to_dict(cfg))
    out = root / "tiny.onnx"
    assert main(["export-onnx", str(root / "tiny.pth"), "--out", str(out), "--height", "96", "--width", "160"]) == 0
    return model, out


@pytest.fixture(scope="module")
def tiny_engine(tiny):
    return OnnxStereo(tiny[1])


def pairs():
    """name -> (left, right): sizes a deployment meets; `odd` is no multiple of 32 on either side."""
    rng = np.random.default_rng(0)
    odd = rng.integers(0, 256, (100, 170, 3), dtype=np.uint8)
    left, right, _ = motorcycle()
    return {"96x160": reference_pair(96, 160), "odd_100x170": (odd, np.roll(odd, -4, axis=1)),
            "736x1280": reference_pair(736, 1280), "motorcycle_500x741": (left, right)}


def test_sidecar_records_what_the_graph_takes(tiny):
    _, out = tiny
    meta = read_sidecar(out)
    assert meta["iterations"] == ITERS and meta["opset"] >= 17 and meta["precision"] == "fp32"
    assert meta["height"] == {"dynamic": True, "multiple_of": 32, "min": 64, "max": 1344} == meta["width"]
    assert meta["batch"] == {"dynamic": False, "size": 1, "why": meta["batch"]["why"]}
    assert meta["external_data"] is None and not out.with_name(out.name + ".data").exists()
    assert meta["model"]["size"] == "tiny" and meta["source"].endswith("tiny.pth")
    import onnx

    graph = onnx.load(str(out))
    assert {op.domain for op in graph.opset_import} <= {"", "ai.onnx"} or all(
        n.domain in ("", "ai.onnx") for n in graph.graph.node)  # standard operators only
    assert [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim][:2] == [1, 3]
    with np.load(out.with_name(meta["reference"]["file"])) as ref:
        assert ref["disparity"].shape == (96, 160) and ref["left"].dtype == np.uint8


@pytest.mark.parametrize("name", list(pairs()))
def test_onnxruntime_matches_pytorch(tiny, tiny_engine, name, record_property):
    model, _ = tiny
    left, right = pairs()[name]
    ours = tiny_engine(left, right)
    ref = torch_disparity(model, left, right)
    assert ours.shape == left.shape[:2]
    diff = difference(ours, ref)
    record_property("parity", diff)
    print(f"tiny {name}: max {diff['max_abs']:.2e} px, mean {diff['mean_abs']:.2e} px")
    assert diff["finite"] and diff["max_abs"] < MAX_ABS_PX and diff["mean_abs"] < MEAN_ABS_PX
    assert np.ptp(ref) > 0.1  # a disparity that varies: agreement on a constant would prove little


def test_runtime_refuses_sizes_outside_the_exported_range(tiny_engine):
    big = np.zeros((1400, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="height 1400 .*outside the exported range 64..1344"):
        tiny_engine(big, big)
    with pytest.raises(ValueError, match="differ in shape"):
        tiny_engine(big, big[:, :32])


def test_infer_with_the_onnx_engine_writes_what_the_pytorch_path_writes(tiny, tmp_path, capsys):
    model, out = tiny
    left, right = pairs()["odd_100x170"]
    (tmp_path / "l.png").write_bytes(encode_png(left))
    (tmp_path / "r.png").write_bytes(encode_png(right))
    common = ["--left", str(tmp_path / "l.png"), "--right", str(tmp_path / "r.png"), "--focal", "500",
              "--baseline", "0.1"]
    pth = out.with_name("tiny.pth")
    assert main(["infer", "--ckpt", str(pth), "--out", str(tmp_path / "torch"), "--device", "cpu", *common]) == 0
    assert main(["infer", "--ckpt", str(out), "--out", str(tmp_path / "onnx"), *common]) == 0  # .onnx: onnx engine
    for name in ("disp.pfm", "disp.png", "disp_color.png", "depth.pfm"):
        assert (tmp_path / "onnx" / name).is_file(), name
    diff = difference(read_pfm(tmp_path / "onnx" / "disp.pfm"), read_pfm(tmp_path / "torch" / "disp.pfm"))
    assert diff["max_abs"] < MAX_ABS_PX
    colour = decode_image((tmp_path / "onnx" / "disp_color.png").read_bytes())
    assert colour.shape[1] == 170 and colour.shape[0] > 100
    assert main(["infer", "--ckpt", str(out), "--out", str(tmp_path / "x"), "--iters", "7", *common]) != 0
    assert "--iters" in capsys.readouterr().err  # fixed in the graph: said, not ignored


def test_check_engine_passes_onnxruntime_and_fails_a_wrong_output(tiny, tmp_path, capsys):
    _, out = tiny
    assert check_engine.main([str(out), "--onnx", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runner"] == "onnxruntime" and result["passed"] and result["max_abs"] < MAX_ABS_PX
    # the same engine against a reference half a pixel off: what a broken engine would look like
    copy = tmp_path / "copy.onnx"
    shutil.copy(out, copy)
    with np.load(out.with_suffix(".reference.npz")) as ref:
        np.savez(copy.with_suffix(".reference.npz"), left=ref["left"], right=ref["right"],
                 disparity=ref["disparity"] + 0.5)
    meta = read_sidecar(out)
    meta["reference"]["file"] = "copy.reference.npz"
    meta["reference"]["sha256"] = hashlib.sha256(copy.with_suffix(".reference.npz").read_bytes()).hexdigest()
    copy.with_suffix(".json").write_text(json.dumps(meta))
    assert check_engine.main([str(out), "--onnx", str(copy)]) == 1
    assert "FAIL" in capsys.readouterr().err
    # a reference file that is not the one the sidecar names
    meta["reference"]["sha256"] = "0" * 64
    copy.with_suffix(".json").write_text(json.dumps(meta))
    assert check_engine.main([str(out), "--onnx", str(copy)]) == 2
    assert "checksum" in capsys.readouterr().err


def test_fp16_variant_keeps_islands_in_fp32_and_stays_finite_at_736x1280(tiny, tmp_path):
    import onnx

    from stereo.deploy.fp16 import FP32_OP_TYPES, convert_to_fp16

    _, out = tiny
    half = tmp_path / "tiny.fp16.onnx"
    kept = convert_to_fp16(out, half)
    graph = onnx.load(str(half))
    weights = [t for t in graph.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT)]
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in weights) > len(weights) // 2  # weights in fp16
    assert "Softmax" in kept and any("cost volumes" in k for k in kept) and set(FP32_OP_TYPES) <= set(kept)
    shutil.copy(out.with_suffix(".json"), half.with_suffix(".json"))
    shutil.copy(out.with_suffix(".reference.npz"), half.with_suffix(".reference.npz"))
    engine = OnnxStereo(half)
    left, right = pairs()["736x1280"]
    disp16 = engine(left, right)
    diff = difference(disp16, OnnxStereo(out)(left, right))
    print(f"fp16 vs fp32 at 736x1280: max {diff['max_abs']:.3f} px, mean {diff['mean_abs']:.4f} px")
    assert diff["finite"]
    assert diff["mean_abs"] < 0.1 and diff["max_abs"] < 2.0


def test_torch_float16_with_the_islands_stays_finite_at_736x1280(tiny):
    """Where onnxruntime's CPU has no fp16 kernel it computes in fp32: the half-precision arithmetic itself is
    checked with torch in float16 (CUDA's autocast rules and the model's fp32 islands)."""
    from stereo.deploy.fp16 import torch_fp16_disparity

    model, _ = tiny
    left, right = pairs()["736x1280"]
    tensors = [torch.from_numpy(x).permute(2, 0, 1)[None].float() for x in (left, right)]
    half = torch_fp16_disparity(model, *tensors, ITERS)[0, 0].numpy()
    diff = difference(half, torch_disparity(model, left, right))
    print(f"torch fp16 vs fp32 at 736x1280: max {diff['max_abs']:.3f} px, mean {diff['mean_abs']:.4f} px")
    assert diff["finite"] and diff["mean_abs"] < 0.1


@pytest.fixture(scope="module")
def hierarchical(tmp_path_factory):
    """A tiny released-layout folder (`model_best_bp2.pth` + `cfg.yaml`, no config inside) exported hierarchical,
    with the weights as external data (forced: the tiny model is far under 2 GB)."""
    root = tmp_path_factory.mktemp("deploy_hiera")
    folder = root / "released"
    model = seeded(tiny_cfg())
    export_released(model, folder / "model_best_bp2.pth", global_step=0, epoch=0)  # cfg.yaml beside, no config
    out = root / "h.onnx"
    assert main(["export-onnx", str(folder), "--out", str(out), "--hierarchical", "--iters", "3", "--height", "128",
                 "--width", "192", "--external-data"]) == 0
    return model, out


def test_hierarchical_export_from_a_released_folder_with_external_data(hierarchical):
    model, out = hierarchical
    meta = read_sidecar(out)
    assert meta["hierarchical"] and meta["iterations"] == 3 and meta["height"]["multiple_of"] == 64
    assert meta["external_data"] == "h.onnx.data" and out.with_name("h.onnx.data").stat().st_size > 100_000
    assert out.stat().st_size < out.with_name("h.onnx.data").stat().st_size  # the weights are outside
    graph = DisparityGraph(model, 3, hierarchical=True)
    engine = OnnxStereo(out)
    for height, width in ((128, 192), (200, 330)):
        left, right = reference_pair(height, width)
        ref = padded_predict(graph, *[torch.from_numpy(x).permute(2, 0, 1)[None].float() for x in (left, right)])
        diff = difference(engine(left, right), ref[0, 0].numpy())
        print(f"hierarchical {height}x{width}: max {diff['max_abs']:.2e} px, mean {diff['mean_abs']:.2e} px")
        assert diff["max_abs"] < MAX_ABS_PX, (height, width, diff)


def test_export_refuses_bad_sources_and_options(tmp_path, capsys):
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "a.pth").write_bytes(b"")
    (folder / "b.pth").write_bytes(b"")
    assert main(["export-onnx", str(folder), "--out", str(tmp_path / "x.onnx")]) == 1
    assert "a.pth" in capsys.readouterr().err
    model = build_model(tiny_cfg())
    with pytest.raises(ExportError, match="not a multiple of 64"):
        export_onnx(model, tmp_path / "x.onnx", ExportSpec(iters=1, hierarchical=True, height=96, width=128))
    with pytest.raises(ExportError, match="opset 17"):
        export_onnx(model, tmp_path / "x.onnx", ExportSpec(iters=1, opset=16))
    with pytest.raises(ExportError, match="--static"):
        export_onnx(model, tmp_path / "x.onnx", ExportSpec(iters=1, height=1408, width=1920))


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    """vits (random weights; max_disp 64 keeps the CPU cost volume small) exported from a run-like .pth."""
    root = tmp_path_factory.mktemp("deploy_vits")
    model = seeded(ModelConfig(size="vits", max_disp=64, valid_iters=ITERS))
    out = root / "vits.onnx"
    export_onnx(model, out, ExportSpec(iters=ITERS, height=64, width=96), log=lambda _: None)
    return model, OnnxStereo(out)


@pytest.mark.parametrize("height,width", [(64, 96), (100, 170), (160, 288)])
def test_vits_onnxruntime_matches_pytorch(vits, height, width):
    model, engine = vits
    left, right = reference_pair(height, width)
    diff = difference(engine(left, right), torch_disparity(model, left, right))
    print(f"vits {height}x{width}: max {diff['max_abs']:.2e} px, mean {diff['mean_abs']:.2e} px")
    assert diff["finite"] and diff["max_abs"] < MAX_ABS_PX and diff["mean_abs"] < MEAN_ABS_PX


def test_plan_prints_the_inference_peak_and_the_largest_image(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["plan", "tiny", "--infer", "200x300", "--gpu", "a100-40gb"]) == 0
    text = capsys.readouterr().out
    assert "peak, default" in text and "peak, hierarchical" in text and "fits" in text
    assert "largest image that fits at this aspect ratio" in text


def test_inference_plan_grows_with_the_image_and_its_largest_image_fits(monkeypatch, tmp_path):
    from stereo.plan import GPUS
    from stereo.plan.inference import _peak, plan_inference

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = tiny_cfg()
    gpu = GPUS["a100-40gb"]
    small, large = plan_inference(cfg, 128, 192, 2, "fp32", gpu), plan_inference(cfg, 512, 768, 2, "fp32", gpu)
    assert large.peak_bytes > 4 * (small.peak_bytes - small.weights_bytes)
    assert large.half_pass_bytes < large.peak_bytes
    height, width = large.largest
    assert abs(width / height - 1.5) < 0.1
    assert _peak(cfg, height, width, 2, "fp32", large.weights_bytes) <= gpu.usable_bytes
    assert _peak(cfg, height + 256, width + 384, 2, "fp32", large.weights_bytes) > gpu.usable_bytes


@pytest.mark.deploy_large
def test_vitl_onnxruntime_matches_pytorch(tmp_path):
    """ViT-L (random weights, the released max_disp 416) exported and checked at two sizes: `make test-deploy-large`."""
    model = seeded(ModelConfig(size="vitl", valid_iters=ITERS))
    out = tmp_path / "vitl.onnx"
    export_onnx(model, out, ExportSpec(iters=ITERS, height=128, width=192))
    engine = OnnxStereo(out)
    for height, width in ((128, 192), (200, 330)):
        left, right = reference_pair(height, width)
        diff = difference(engine(left, right), torch_disparity(model, left, right))
        print(f"vitl {height}x{width}: max {diff['max_abs']:.2e} px, mean {diff['mean_abs']:.2e} px")
        assert diff["finite"] and diff["max_abs"] < MAX_ABS_PX and diff["mean_abs"] < MEAN_ABS_PX


FULL_MIDDLEBURY = (1988, 2964)  # (height, width): Middlebury 2014's Motorcycle at full resolution


@pytest.mark.deploy_large
def test_fp16_stays_finite_at_full_middlebury_size(tmp_path):
    """The fp16 export at full Middlebury size (static: sides past 1344 px) through onnxruntime, and the torch float16
    run of the same model, against the fp32 PyTorch disparity: `make test-deploy-large`."""
    from stereo.deploy.fp16 import torch_fp16_disparity

    model = seeded(tiny_cfg())
    height, width = FULL_MIDDLEBURY
    padded = [side + (-side % 32) for side in FULL_MIDDLEBURY]
    out = tmp_path / "middlebury.fp16.onnx"
    export_onnx(model, out, ExportSpec(iters=ITERS, height=padded[0], width=padded[1], static=True,
                                       precision="fp16"))
    left, right = reference_pair(height, width)
    fp32 = torch_disparity(model, left, right)
    onnx16 = difference(OnnxStereo(out)(left, right), fp32)
    tensors = [torch.from_numpy(x).permute(2, 0, 1)[None].float() for x in (left, right)]
    torch16 = difference(torch_fp16_disparity(model, *tensors, ITERS)[0, 0].numpy(), fp32)
    for name, diff in (("onnxruntime fp16", onnx16), ("torch float16", torch16)):
        print(f"{name} vs fp32 at {height}x{width}: max {diff['max_abs']:.3f} px, mean {diff['mean_abs']:.4f} px, "
              f"finite {diff['finite']}")
    assert onnx16["finite"] and onnx16["mean_abs"] < 0.1 and onnx16["max_abs"] < 2.0
    assert torch16["finite"] and torch16["mean_abs"] < 0.1
