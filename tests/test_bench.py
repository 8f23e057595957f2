"""The benchmark command: on a CPU it picks the tiny model by itself and says so, times eager and compiled side by
side, prints a table and writes its JSON report."""

from __future__ import annotations

import json

from stereo.cli import main
from stereo.plan.gpus import GPUS, peak_bf16_tflops


def test_bench_picks_the_tiny_model_on_a_cpu_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    args = ["bench", "--device", "cpu", "--height", "32", "--width", "64", "--iters", "2", "--batch", "1",
            "--steps", "1", "--warmup", "0", "--infer-height", "40", "--infer-width", "50", "--infer-iters", "2",
            "--backend", "aot_eager", "--out", str(out)]  # aot_eager: the compiled runner without code generation
    assert main(args) == 0  # no --size: `make bench` on a CPU
    printed = capsys.readouterr()
    assert "bench: no GPU: the tiny model" in printed.err
    table = printed.out.splitlines()
    assert table[0].startswith("tiny on ") and "median ms" in table[2] and "{" not in printed.out  # no raw JSON
    rows = [line.split() for line in table[3:7]]
    assert [(r[0], r[3] if r[0] == "train" else r[1]) for r in rows] == [
        ("train", "eager"), ("train", "compiled"), ("inference", "eager"), ("inference", "compiled")]
    assert all(line.endswith("n/a (CPU: resident set)") for line in table[3:7])
    assert "compiled training (batch 1):" in printed.out and "x eager" in printed.out
    report = json.loads(out.read_text())
    assert report["size"] == "tiny" and report["precision"] == "fp32" and report["max_disp"] == 64
    assert [(r["runner"], r["batch"]) for r in report["train"]] == [("eager", 1), ("compiled", 1)]
    assert [r["runner"] for r in report["infer"]] == ["eager", "compiled"]
    eager_train, compiled_train = report["train"]
    assert eager_train["compile_s"] == 0 and compiled_train["compile_s"] > 0  # the compiled row's first step
    for result in report["train"] + report["infer"]:
        assert result["median_ms"] > 0 and result["samples_per_s"] > 0 and result["peak_mem_gib"] > 0
        assert result["tflop_per_sample"] > 0 and result["mfu"] is None  # no GPU peak on a CPU
        assert 0 < result["planned_peak_gib"] < result["peak_mem_gib"]  # the plan counts tensors, RSS everything
        assert result["plan_error"] is None  # a resident set is no allocator figure
    # a training step counts forward and backward: more FLOPs per sample than one 2-iteration inference
    assert report["train"][0]["tflop_per_sample"] > report["infer"][0]["tflop_per_sample"] * 0.5
    # forward + loss + backward dispatch more operators than the test-mode forward alone
    assert report["train"][0]["operators"] > 2 * report["infer"][0]["operators"] > 0
    assert report["released_h100"]["train_batch2"]["median_ms"] == 974.0


def test_peak_table_knows_the_planners_gpus():
    assert peak_bf16_tflops("Intel Xeon") is None
    assert {name: gpu.peak_tflops for name, gpu in GPUS.items()} == {
        "h100-80gb": 989.0, "h200-141gb": 989.0, "a100-80gb": 312.0, "a100-40gb": 312.0,
        "rtx4090-24gb": 165.0, "rtx3090-24gb": 71.0}
