"""The benchmark command runs the tiny model on the CPU and writes its JSON report."""

from __future__ import annotations

import json

import torch

from stereo.bench import peak_bf16_tflops
from stereo.cli import main


def test_bench_tiny_cpu_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--size", "tiny", "--device", "cpu", "--height", "32", "--width", "64", "--iters", "2",
            "--batch", "1", "--steps", "1", "--warmup", "0", "--infer-height", "40", "--infer-width", "50",
            "--infer-iters", "2", "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["size"] == "tiny" and report["precision"] == "fp32" and report["max_disp"] == 64
    assert [r["batch"] for r in report["train"]] == [1]
    for result in report["train"] + [report["infer"]]:
        assert result["median_ms"] > 0 and result["samples_per_s"] > 0 and result["peak_mem_gib"] > 0
        assert result["tflop_per_sample"] > 0 and result["mfu"] is None  # no GPU peak on a CPU
    # a training step counts forward and backward: more FLOPs per sample than one 2-iteration inference
    assert report["train"][0]["tflop_per_sample"] > report["infer"]["tflop_per_sample"] * 0.5
    # forward + loss + backward dispatch more operators than the test-mode forward alone
    assert report["train"][0]["operators"] > 2 * report["infer"]["operators"] > 0
    assert report["released_h100"]["train_batch2"]["median_ms"] == 974.0


def test_peak_table_knows_the_h100_and_not_the_cpu():
    assert peak_bf16_tflops(torch.device("cpu")) is None
