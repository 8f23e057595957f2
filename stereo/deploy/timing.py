"""onnxruntime against PyTorch eager inference on the CPU, on the same model, pair and thread count (`make bench`)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stereo.config.schema import ModelConfig
from stereo.deploy.onnx_export import ExportSpec, export_onnx
from stereo.deploy.parity import difference
from stereo.deploy.reference import reference_pair
from stereo.deploy.runtime import OnnxStereo
from stereo.model.infer import predict


def _median_ms(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def compare_cpu(cfg: ModelConfig, height: int, width: int, iters: int, steps: int = 3, warmup: int = 1,
                log=print) -> dict:
    """Export a model of `cfg` (seeded random weights: speed does not depend on them) at height x width (multiples of
    32), then time one pair through PyTorch eager and through onnxruntime with the same threads: median ms, ratio."""
    from stereo.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    threads = torch.get_num_threads()
    left, right = reference_pair(height, width)
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_onnx(model, Path(tmp) / f"{cfg.size}.onnx",
                               ExportSpec(iters=iters, height=height, width=width), log=log)
        engine = OnnxStereo(exported.onnx, threads=threads)
        tensors = [torch.from_numpy(x).permute(2, 0, 1)[None].float() for x in (left, right)]

        def eager() -> np.ndarray:
            return predict(model, *tensors, iters)[0, 0].numpy()

        torch_ms = _median_ms(eager, steps, warmup)
        ort_ms = _median_ms(lambda: engine(left, right), steps, warmup)
        parity = difference(engine(left, right), eager())
    return {"size": cfg.size, "height": height, "width": width, "iters": iters, "threads": threads,
            "torch_eager_ms": round(torch_ms, 1), "onnxruntime_ms": round(ort_ms, 1),
            "speedup": round(torch_ms / ort_ms, 2), "export_s": round(exported.seconds, 1),
            "max_abs_px": parity["max_abs"], "mean_abs_px": parity["mean_abs"]}
