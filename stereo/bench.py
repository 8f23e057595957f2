"""`python -m stereo bench`: time a training step and inference; peak memory and MFU, written as JSON.

Training step = train-mode forward + the paper loss + backward + AdamW (the defaults: 320x736, 22 iterations,
bf16 autocast, batch 2 and 4); inference = test-mode forward at 480x640 with 32 iterations. FLOPs are counted
once per configuration with torch's FlopCounterMode on the meta device (convolutions, matmuls, attention;
elementwise ops are not counted), so MFU = counted FLOP/s over the GPU's dense bf16 peak. The same pass counts the
operators an eager step dispatches (views excluded): about one GPU kernel launch each, the cost that dominates a
launch-bound step. Weights are random: speed does not depend on
them. `--size tiny --height 128 --width 256 --iters 4 --batch 2 --device cpu` runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from stereo.config.schema import LossConfig, ModelConfig
from stereo.model.precision import resolve_precision

# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor data sheets). Matched against the device name in order.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A40", 150.0), ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)

# The released implementation on one H100 (our measurement of NVlabs' code; see docs/performance.md).
RELEASED_H100 = {
    "train_batch2": {"median_ms": 974.0, "samples_per_s": 2.05, "peak_mem_gib": 33.3},
    "train_batch4": {"median_ms": 1418.0, "samples_per_s": 2.82, "peak_mem_gib": 64.5},
    "infer": {"median_ms": 271.0, "peak_mem_gib": 2.9},
    "tflop_per_sample_fwd_bwd": 24.8,
}


def peak_bf16_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    """CUDA: peak allocated by torch since the last reset; CPU: the process's peak resident set (never resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _images(batch: int, height: int, width: int, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    left = torch.rand(batch, 3, height, width, generator=g) * 255
    right = torch.roll(left, shifts=-8, dims=3)  # a plausible pair: a constant 8 px shift
    return left.to(device), right.to(device)


def _timed(fn, steps: int, warmup: int, device: torch.device, label: str) -> list[float]:
    for _ in tqdm(range(warmup), desc=f"{label} warm-up", leave=False, file=sys.stderr):
        fn()
    times = []
    for _ in tqdm(range(steps), desc=label, leave=False, file=sys.stderr):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


class OperatorCounter(TorchDispatchMode):
    """Counts the non-view operators dispatched (a view changes metadata only and launches nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def count_work(cfg: ModelConfig, batch: int, height: int, width: int, iters: int, train: bool) -> tuple[int, int]:
    """(FLOPs, operators) of one forward (+ loss and backward when `train`), counted on the meta device: no compute,
    no memory. Neither depends on dtype, so autocast is left out here."""
    from stereo.model import build_model
    from stereo.train.loss import stereo_loss

    with torch.device("meta"):
        model = build_model(cfg)
        left = torch.zeros(batch, 3, height, width)
        gt = torch.ones(batch, 1, height, width)
    model.train(train)
    with FlopCounterMode(display=False) as counter, OperatorCounter() as operators:
        if train:
            init_disp, preds = model(left, left, iters=iters)
            stereo_loss(init_disp, preds, gt, gt > 0, cfg.max_disp, LossConfig())["total"].backward()
        else:
            with torch.no_grad():
                model(left, left, iters=iters, test_mode=True)
    return counter.get_total_flops(), operators.count


def _result(times: list[float], work: tuple[int, int], samples: int, device: torch.device) -> dict:
    flops, operators = work
    median = statistics.median(times)
    peak = peak_bf16_tflops(device)
    return {
        "median_ms": 1000 * median,
        "min_ms": 1000 * min(times),
        "samples_per_s": samples / median,
        "peak_mem_gib": _peak_gib(device),
        "tflop_per_sample": flops / samples / 1e12,
        "tflop_per_s": flops / median / 1e12,
        "operators": operators,
        "mfu": flops / median / (peak * 1e12) if peak else None,
    }


def bench_train(model, batch: int, height: int, width: int, iters: int, bf16: bool, device: torch.device,
                steps: int, warmup: int) -> dict:
    from stereo.train.loss import stereo_loss

    left, right = _images(batch, height, width, device, seed=batch)
    gt = torch.rand(batch, 1, height, width, device=device) * (model.cfg.max_disp - 2) + 1
    valid = torch.ones_like(gt, dtype=torch.bool)
    optimizer = torch.optim.AdamW(model.param_groups(1e-4, 1e-5), lr=1e-4)
    loss_cfg = LossConfig()
    model.train()

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            init_disp, preds = model(left, right, iters=iters)
        loss = stereo_loss(init_disp, preds, gt, valid, model.cfg.max_disp, loss_cfg)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    work = count_work(model.cfg, batch, height, width, iters, train=True)
    _reset_peak(device)
    times = _timed(step, steps, warmup, device, f"train batch {batch}")
    return {"batch": batch, "height": height, "width": width, "iters": iters, **_result(times, work, batch, device)}


def bench_infer(model, height: int, width: int, iters: int, bf16: bool, device: torch.device, steps: int,
                warmup: int) -> dict:
    from stereo.model.infer import predict

    left, right = _images(1, height, width, device, seed=0)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            predict(model, left, right, iters)

    padded = (-(-height // 32) * 32, -(-width // 32) * 32)  # predict pads to multiples of 32
    work = count_work(model.cfg, 1, *padded, iters, train=False)
    _reset_peak(device)
    times = _timed(step, steps, warmup, device, "inference")
    return {"batch": 1, "height": height, "width": width, "iters": iters, **_result(times, work, 1, device)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=["tiny", "vits", "vitb", "vitl"], default="vitl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--height", type=int, default=320, help="training crop height")
    parser.add_argument("--width", type=int, default=736, help="training crop width")
    parser.add_argument("--iters", type=int, default=22, help="GRU iterations in training")
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 4], help="training batch sizes to time")
    parser.add_argument("--max-disp", type=int, help="model.max_disp (default: the config default, 416)")
    parser.add_argument("--infer-height", type=int, default=480)
    parser.add_argument("--infer-width", type=int, default=640)
    parser.add_argument("--infer-iters", type=int, default=32)
    parser.add_argument("--no-infer", action="store_true", help="time training only")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (the median is kept)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, cuDNN, compile)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights and inputs for the 2-D convs")
    parser.add_argument("--out", type=Path, help="JSON file (default runs/bench/bench-<size>-<device>.json)")


def _build(args: argparse.Namespace, device: torch.device):
    from stereo.model import build_model

    cfg = ModelConfig(size=args.size, channels_last=args.channels_last)
    if args.size == "tiny":
        cfg.hidden_dims = [32, 32, 32]  # the tiny preset's width (configs/tiny.yaml)
        cfg.max_disp = 64
    if args.max_disp:
        cfg.max_disp = args.max_disp
    model = build_model(cfg).to(device)
    return model


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    bf16 = resolve_precision(args.precision or "auto", device, "--precision") == "bf16"
    torch.manual_seed(0)
    model = _build(args, device)
    runner = torch.compile(model) if args.compile else model
    if args.compile:  # the compiled wrapper must still expose what the benchmark uses
        runner.cfg, runner.param_groups = model.cfg, model.param_groups
    report: dict = {
        "size": args.size, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(), "precision": "bf16" if bf16 else "fp32", "compile": args.compile,
        "channels_last": args.channels_last, "max_disp": model.cfg.max_disp, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "peak_bf16_tflops": peak_bf16_tflops(device), "train": [],
        "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "released_h100": RELEASED_H100,
    }
    for batch in args.batch:
        try:
            result = bench_train(runner, batch, args.height, args.width, args.iters, bf16, device, args.steps,
                                 args.warmup)
        except torch.cuda.OutOfMemoryError:
            result = {"batch": batch, "oom": True}
            torch.cuda.empty_cache()
        report["train"].append(result)
        print(json.dumps(result), file=sys.stderr)
    if not args.no_infer:
        report["infer"] = bench_infer(runner, args.infer_height, args.infer_width, args.infer_iters, bf16, device,
                                      args.steps, args.warmup)
        print(json.dumps(report["infer"]), file=sys.stderr)
    out = args.out or Path("runs/bench") / f"bench-{args.size}-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0
