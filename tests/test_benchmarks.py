"""Each benchmark protocol on a fake tree in the official layout, run end to end with the real tiny model."""

import json

import numpy as np
import pytest
import torch

import fakedata
from stereo.config.load import load_config
from stereo.data.codecs import read_pfm, write_pfm
from stereo.data.sample import encode_checked
from stereo.data.shards import write_shards
from stereo.data.sources import get_source
from stereo.eval.benchmarks import BENCHMARKS, BenchmarkSamples, left_right_consistent, rescale
from stereo.eval.runner import evaluate
from stereo.model import build_model

# benchmark -> (fake tree writer, samples the benchmark must select from it)
TREES = {
    "kitti12": (fakedata.make_kitti12, 3),
    "kitti15": (fakedata.make_kitti15, 3),
    "middeval3": (lambda root: fakedata.make_middeval3(root, "H"), 2),
    "middlebury2014": (fakedata.make_middlebury2014, 2),
    "eth3d": (fakedata.make_eth3d, 2),
    "sceneflow": (fakedata.make_sceneflow, 1),  # FlyingThings3D TEST, final pass only
}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(load_config("tiny").model)


def right_view_disparity(disp_left: np.ndarray) -> np.ndarray:
    """Forward-warp the left disparity to the right view (nearest surface wins); inf where nothing lands."""
    right = np.full(disp_left.shape, -np.inf, np.float32)
    for y, x in zip(*np.nonzero(np.isfinite(disp_left))):
        target = x - int(round(disp_left[y, x]))
        if target >= 0:
            right[y, target] = max(right[y, target], disp_left[y, x])
    return np.where(np.isfinite(right), right, np.inf).astype(np.float32)


def test_every_benchmark_has_a_fake_tree():
    # `demo` reads the demo shards only (tests/test_walkthrough.py evaluates a run on them)
    assert set(TREES) == {name for name, bench in BENCHMARKS.items() if bench.source is not None}


@pytest.mark.parametrize("name", sorted(TREES))
def test_benchmark_selects_the_protocol_pixels_and_runs_the_model(name, tmp_path, tiny_model):
    make, count = TREES[name]
    fake = make(tmp_path / name)
    if name == "middlebury2014":  # the fake's disp1.pfm is a copy of disp0; make it the true right view
        for scene in fake.root.iterdir():
            write_pfm(scene / "disp1.pfm", right_view_disparity(read_pfm(scene / "disp0.pfm")))
    bench = BENCHMARKS[name]
    samples = BenchmarkSamples(bench, fake.root)
    assert len(samples) == count
    expected = fake.by_left()
    decoded = list(samples)
    for sample in decoded:
        truth = expected[sample["meta"]["path"]]
        if bench.scale == 1.0:
            np.testing.assert_allclose(sample["disp"], truth.disp, atol=1e-3)
            assert np.array_equal(sample["valid"], truth.disp > 0)
        else:  # Middlebury 2014: half resolution, disparity halved
            assert sample["left"].shape == (fakedata.H // 2, fakedata.W // 2, 3)
            np.testing.assert_allclose(sample["disp"], truth.disp[::2, ::2] * 0.5, atol=1e-3)
        if "noc" in bench.headline[0] or name.startswith("kitti"):
            assert sample["nocc"] is not None and not (sample["nocc"] & ~sample["valid"]).any()
        if truth.nocc is not None and bench.scale == 1.0:
            assert np.array_equal(sample["nocc"], truth.nocc)

    # the model on one pair per benchmark keeps the suite fast; the pixel selection above covered them all
    first = decoded[:1]
    result = evaluate(tiny_model, first, iters=1, device="cpu", progress=False, headline=bench.headline)
    assert result["images"] == 1 and len(result["rows"]) == 1
    assert result["pixels"] == int(first[0]["valid"].sum())
    assert result["pixels_noc"] == (int(first[0]["nocc"].sum()) if first[0]["nocc"] is not None else 0)
    for key in bench.headline:
        assert result[key] is not None and np.isfinite(result[key]), key
    assert (result["rows"][0]["height"], result["rows"][0]["width"]) == first[0]["disp"].shape


def test_shards_give_the_same_samples_as_the_raw_tree(tmp_path):
    fake = fakedata.make_kitti15(tmp_path / "kitti")
    raws = get_source("kitti15").list_samples(fake.root)
    write_shards(raws, encode_checked, tmp_path / "shards", "kitti15", workers=0)
    bench = BENCHMARKS["kitti15"]
    from_raw = list(BenchmarkSamples(bench, fake.root))
    from_shards = BenchmarkSamples(bench, tmp_path / "shards", limit=2)
    assert len(from_shards) == 2
    shard_samples = list(from_shards)
    assert [s["key"] for s in shard_samples] == [s["key"] for s in from_raw[:2]]
    for a, b in zip(shard_samples, from_raw):
        assert np.array_equal(a["disp"], b["disp"]) and np.array_equal(a["nocc"], b["nocc"])
        assert np.array_equal(a["left"], b["left"])


def test_left_right_check_by_hand():
    # one row: left disparities 1 everywhere; the right view agrees except at x=2 (sees something nearer)
    left = np.array([[1.0, 1.0, 1.0, 1.0]], np.float32)
    right = np.array([[1.0, 5.0, 1.0, 1.0]], np.float32)
    # x=0 lands outside (x - 1 < 0); x=2 lands on right x=1 (5 != 1): occluded; x=1, x=3 consistent
    assert left_right_consistent(left, right).tolist() == [[False, True, False, True]]


def test_rescale_halves_size_and_disparity_without_mixing_invalid_pixels():
    disp = np.array([[8, 0, 8, 8], [8, 8, 8, 8]], np.float32)
    sample = {"left": np.zeros((2, 4, 3), np.uint8), "right": np.zeros((2, 4, 3), np.uint8), "disp": disp,
              "valid": disp > 0, "nocc": None}
    half = rescale(sample, 0.5)
    assert half["left"].shape == (1, 2, 3)
    assert half["disp"].tolist() == [[4.0, 4.0]]  # nearest neighbours: never an average with the 0
    assert half["valid"].tolist() == [[True, True]]


def test_eval_results_file_is_json_with_null_for_missing_noc(tmp_path, tiny_model):
    fake = fakedata.make_sceneflow(tmp_path / "sf")
    result = evaluate(tiny_model, BenchmarkSamples(BENCHMARKS["sceneflow"], fake.root), iters=1, device="cpu",
                      out_dir=tmp_path / "out", progress=False)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["summary"]["epe/pooled"] == pytest.approx(result["epe/pooled"])
    assert written["summary"]["epe_noc/pooled"] is None  # Scene Flow has no occlusion masks
    assert len(written["images"]) == 1 and (tmp_path / "out" / written["images"][0]["panel"]).is_file()


def test_evaluate_keeps_the_callers_training_mode(tiny_model):
    sample = {"key": "k", "left": np.zeros((8, 8, 3), np.uint8), "right": np.zeros((8, 8, 3), np.uint8),
              "disp": np.ones((8, 8), np.float32), "valid": np.ones((8, 8), bool), "nocc": None}
    tiny_model.train()
    try:
        result = evaluate(tiny_model, iter([sample]), iters=1, device="cpu", progress=False)
        assert tiny_model.training and result["pixels"] == 64 and result["pixels_noc"] == 0
    finally:
        tiny_model.eval()


@pytest.mark.gpu
def test_evaluate_on_gpu_matches_cpu(tmp_path, tiny_model):
    fake = fakedata.make_eth3d(tmp_path / "eth3d")
    samples = list(BenchmarkSamples(BENCHMARKS["eth3d"], fake.root))
    on_cpu = evaluate(tiny_model, samples, iters=2, device="cpu", progress=False)
    on_gpu = evaluate(tiny_model.to("cuda"), samples, iters=2, device="cuda", progress=False)
    tiny_model.to("cpu")
    assert on_gpu["epe/pooled"] == pytest.approx(on_cpu["epe/pooled"], rel=1e-2, abs=1e-2)
