"""`python -m stereo bench`: time a training step and inference, eager and compiled side by side; peak memory against
the plan, and MFU. A table on stdout, every figure in the JSON file.

Training step = train-mode forward + the paper loss + backward + AdamW (on a GPU: 320x736, 22 iterations, bf16
autocast over fp32 weights, batch 2 and 4); inference = test-mode forward at 480x640 with 32 iterations. Which model
runs depends on the device found, and the command says so: on a GPU the ViT-L (a smaller size when the plan says the
ViT-L does not fit, and only the batches that fit), on a CPU the tiny model of `configs/tiny.yaml` at 128x256 (a
ViT-L step at the training crop takes minutes there); `--size` and the shape options choose otherwise.

FLOPs, operators and the planned peak memory come from the planner's simulation of the same step
(`stereo.plan.simulate`, cached): FLOPs count convolutions, matmuls and attention (elementwise work is not counted,
as usual for MFU), so MFU = counted FLOP/s over the GPU's dense bf16 peak; operators are the non-view operators
dispatched, about one GPU kernel launch each in eager mode. Weights are random: speed does not depend on them.

Runners: `eager`, and `compiled`, the trainer's `train.compile=regions` (the feature and context networks, one GRU
iteration and the loss, each compiled; `--iteration-mode reduce-overhead` captures the iteration in CUDA graphs).
A compiled row's compile seconds are dynamo's and Inductor's time in its first step. Other back ends add rows of
their own through `RUNNERS`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from stereo.config.schema import LossConfig, ModelConfig
from stereo.model.precision import resolve_precision
from stereo.plan.budget import model_states, parameter_counts, simulated_step
from stereo.plan.gpus import GIB, local_gpu, peak_bf16_tflops

# The released implementation on one H100 (our measurement of NVlabs' code; see docs/performance.md).
RELEASED_H100 = {
    "train_batch2": {"median_ms": 974.0, "samples_per_s": 2.05, "peak_mem_gib": 33.3},
    "train_batch4": {"median_ms": 1418.0, "samples_per_s": 2.82, "peak_mem_gib": 64.5},
    "infer": {"median_ms": 271.0, "peak_mem_gib": 2.9},
    "tflop_per_sample_fwd_bwd": 24.8,
}
SIZES = ("vitl", "vitb", "vits", "tiny")  # largest first: on a GPU the first whose plan fits runs
GPU_SHAPES = dict(height=320, width=736, iters=22, batch=[2, 4], infer_height=480, infer_width=640, infer_iters=32,
                  steps=10, warmup=3)
CPU_SHAPES = dict(height=128, width=256, iters=4, batch=[2], infer_height=128, infer_width=256, infer_iters=8,
                  steps=3, warmup=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    """CUDA: peak allocated by torch since the last reset; CPU: the process's peak resident set (never resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _images(batch: int, height: int, width: int, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    left = torch.rand(batch, 3, height, width, generator=g) * 255
    right = torch.roll(left, shifts=-8, dims=3)  # a plausible pair: a constant 8 px shift
    return left.to(device), right.to(device)


def _timed(fn, steps: int, warmup: int, device: torch.device, label: str) -> tuple[list[float], float]:
    """(the timed steps' seconds, the first step's: cuDNN autotuning and compilation land there)."""
    times = []
    for i in tqdm(range(warmup + steps), desc=label, leave=False, file=sys.stderr):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times[warmup:], times[0]


def simulated_work(cfg: ModelConfig, batch: int, height: int, width: int, iters: int, train: bool, bf16: bool,
                   device: torch.device) -> dict:
    """The planner's simulation of what the benchmark runs (fp32 weights, autocast): FLOPs, operators and memory.
    On a GPU with its autocast rules."""
    return simulated_step(cfg, batch, (height, width), iters, "bf16" if bf16 else "fp32", train=train,
                          gpu=device.type == "cuda", amp=True)


def planned_peak_gib(cfg: ModelConfig, work: dict, train: bool) -> float:
    """The simulated step's peak above the model states, plus the fp32 weights (and for training their gradients and
    AdamW's moments): the plan of what `torch.cuda.max_memory_allocated` measures."""
    trainable, frozen = parameter_counts(cfg)
    states = model_states(trainable, frozen, "fp32", zero_stage=0, world_size=1, ema=False)
    static = states["frozen weights"] + states["trainable weights"]
    if train:
        static += states["gradients"] + states["optimizer states"]
    return (static + work["peak_bytes"]) / GIB


def _result(timed: tuple[list[float], float], work: dict, samples: int, device: torch.device,
            planned_gib: float | None) -> dict:
    times, first = timed
    median = statistics.median(times)
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    measured = _peak_gib(device)
    return {
        "median_ms": 1000 * median,
        "min_ms": 1000 * min(times),
        "first_step_ms": 1000 * first,
        "samples_per_s": samples / median,
        "peak_mem_gib": measured,
        "planned_peak_gib": planned_gib,
        # the planner's error against torch's allocator (a CPU's resident set is no allocator figure)
        "plan_error": measured / planned_gib - 1 if device.type == "cuda" and planned_gib else None,
        "tflop_per_sample": work["flops"] / samples / 1e12,
        "tflop_per_s": work["flops"] / median / 1e12,
        "operators": work["operators"],
        "mfu": work["flops"] / median / (peak * 1e12) if peak else None,
    }


def bench_train(model, max_disp: int, batch: int, height: int, width: int, iters: int, bf16: bool,
                device: torch.device, steps: int, warmup: int, work: dict, planned_gib: float | None,
                loss_fn: Callable | None = None) -> dict:
    """Time forward + loss + backward + AdamW over the trainable parameters of `model` (ours or the released one)."""
    from stereo.train.loss import stereo_loss

    loss_fn = loss_fn or stereo_loss
    left, right = _images(batch, height, width, device, seed=batch)
    gt = torch.rand(batch, 1, height, width, device=device) * (max_disp - 2) + 1
    valid = torch.ones_like(gt, dtype=torch.bool)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_cfg = LossConfig()
    model.train()

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            init_disp, preds = model(left, right, iters=iters)
        loss = loss_fn(init_disp, preds, gt, valid, max_disp, loss_cfg)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    _reset_peak(device)
    try:
        timed = _timed(step, steps, warmup, device, f"train batch {batch}")
    finally:
        model.zero_grad(set_to_none=True)  # what follows measures without this step's gradients
    return {"batch": batch, "height": height, "width": width, "iters": iters,
            **_result(timed, work, batch, device, planned_gib)}


def bench_infer(model, height: int, width: int, iters: int, bf16: bool, device: torch.device, steps: int,
                warmup: int, work: dict, planned_gib: float | None) -> dict:
    from stereo.model.infer import predict

    left, right = _images(1, height, width, device, seed=0)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            predict(model, left, right, iters)

    _reset_peak(device)
    timed = _timed(step, steps, warmup, device, "inference")
    return {"batch": 1, "height": height, "width": width, "iters": iters,
            **_result(timed, work, 1, device, planned_gib)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=("auto", *SIZES), default="auto",
                        help="auto: the largest that fits the GPU found; tiny on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    shapes = "(default: 320x736, 22 on a GPU; 128x256, 4 on a CPU)"
    parser.add_argument("--height", type=int, help=f"training crop height {shapes}")
    parser.add_argument("--width", type=int, help="training crop width")
    parser.add_argument("--iters", type=int, help="GRU iterations in training")
    parser.add_argument("--batch", type=int, nargs="+", help="training batch sizes to time (GPU: 2 4; CPU: 2)")
    parser.add_argument("--max-disp", type=int, help="model.max_disp (default: the size's, 416; tiny 64)")
    parser.add_argument("--infer-height", type=int, help="(GPU: 480; CPU: 128)")
    parser.add_argument("--infer-width", type=int, help="(GPU: 640; CPU: 256)")
    parser.add_argument("--infer-iters", type=int, help="(GPU: 32; CPU: 8)")
    parser.add_argument("--no-train", action="store_true", help="time inference only")
    parser.add_argument("--no-infer", action="store_true", help="time training only")
    parser.add_argument("--steps", type=int, help="timed steps per configuration, the median is kept (GPU 10, CPU 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first: allocator, cuDNN, compile (GPU 3, CPU 1)")
    parser.add_argument("--runners", nargs="+", default=["eager", "compiled"],
                        help="what to time, side by side (default: eager compiled; see RUNNERS)")
    parser.add_argument("--backend", default="inductor",
                        help="the compiled runner's torch.compile backend (aot_eager: the capture, no code generation)")
    parser.add_argument("--iteration-mode", choices=["default", "reduce-overhead"], default="default",
                        help="the compiled GRU iteration's mode; reduce-overhead: CUDA graphs (GPU)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights and inputs for the 2-D convs")
    parser.add_argument("--onnx", nargs="*", choices=SIZES, default=[],
                        help="also onnxruntime vs PyTorch eager inference on the CPU for these sizes (stereo.deploy)")
    parser.add_argument("--out", type=Path, help="JSON file (default runs/bench/bench-<size>-<device>.json)")


def model_config(size: str, max_disp: int | None = None, channels_last: bool = False) -> ModelConfig:
    """The benchmarked model: a released size, or the tiny model of configs/tiny.yaml."""
    if size == "tiny":
        from stereo.config import load_config

        cfg = load_config("tiny").model
    else:
        cfg = ModelConfig(size=size)
    cfg.channels_last = channels_last
    if max_disp:
        cfg.max_disp = max_disp
    return cfg


def _fill_shapes(args: argparse.Namespace, device: torch.device) -> None:
    for key, value in (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _choose(args: argparse.Namespace, device: torch.device, bf16: bool) -> tuple[ModelConfig, list[int], list[str]]:
    """The model and the batches to time, with what was decided and why (printed)."""
    if device.type != "cuda":
        size = "tiny" if args.size == "auto" else args.size
        why = ["no GPU: the tiny model (a ViT-L step at 320x736 takes minutes on a CPU; --size vitl or "
               "`make bench SIZE=vitl` runs it anyway)" if args.size == "auto" else f"--size {size} on the CPU"]
        return model_config(size, args.max_disp, args.channels_last), args.batch, why
    gpu = local_gpu(device.index or 0)
    why = []
    for size in (SIZES if args.size == "auto" else (args.size,)):
        cfg = model_config(size, args.max_disp, args.channels_last)
        fits = [b for b in args.batch if args.no_train or planned_peak_gib(cfg, simulated_work(
            cfg, b, args.height, args.width, args.iters, True, bf16, device), True) <= gpu.usable_bytes / GIB]
        dropped = sorted(set(args.batch) - set(fits))
        if dropped:
            why.append(f"{size}: batch {' '.join(map(str, dropped))} does not fit {gpu.usable_bytes / GIB:.0f} GiB "
                       f"usable on {gpu.name} (planned)")
        if fits or args.size != "auto":
            why.append(f"{size} on {gpu.name}" + (f", batch {' '.join(map(str, fits))}" if fits else ""))
            return cfg, fits, why
    return cfg, [], why


@dataclass
class Runner:
    """A row group of the table: `prepare(model, args)` readies the model (or wraps it) and returns what to time:
    (the callable `model(left, right, iters=..)`-like, the loss function or None). `train`: whether it trains."""

    name: str
    prepare: Callable
    train: bool = True


def _eager(model, args):
    model.compiled = {}
    return model, None


def _compiled(model, args):
    from stereo.train.loss import stereo_loss

    torch._dynamo.reset()  # every compiled runner starts cold in this process (Inductor's disk cache still counts)
    mode = None if args.iteration_mode == "default" else args.iteration_mode
    model.compile_regions(iteration_mode=mode, backend=args.backend)
    return model, torch.compile(stereo_loss, dynamic=False, backend=args.backend)


# Runners by name; an inference back end of its own (e.g. ONNX Runtime in stereo/deploy) adds one with train=False.
RUNNERS: dict[str, Runner] = {"eager": Runner("eager", _eager), "compiled": Runner("compiled", _compiled)}


def _compile_seconds() -> float:
    from torch._dynamo.utils import compilation_time_metrics

    return sum(sum(v) for k, v in compilation_time_metrics.items() if k.endswith("compile_inner"))


def _timed_row(runner: str, fn: Callable[[], dict]) -> dict:
    before = _compile_seconds()
    row = fn()
    return {"runner": runner, **row, "compile_s": _compile_seconds() - before}


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    bf16 = resolve_precision(args.precision or "auto", device, "--precision") == "bf16"
    _fill_shapes(args, device)
    unknown = [r for r in args.runners if r not in RUNNERS]
    if unknown:
        raise SystemExit(f"--runners: unknown {', '.join(unknown)} (known: {', '.join(RUNNERS)})")
    cfg, batches, why = _choose(args, device, bf16)
    print("bench: " + "; ".join(why), file=sys.stderr)
    from stereo.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    report: dict = {
        "size": cfg.size, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(), "precision": "bf16" if bf16 else "fp32",
        "runners": args.runners, "backend": args.backend, "iteration_mode": args.iteration_mode,
        "channels_last": args.channels_last, "max_disp": cfg.max_disp,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "chosen": why,
        "peak_bf16_tflops": peak_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None,
        "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "released_h100": RELEASED_H100, "train": [], "infer": [],
    }
    out = args.out or Path("runs/bench") / f"bench-{cfg.size}-{device.type}.json"
    train_work = {b: simulated_work(cfg, b, args.height, args.width, args.iters, True, bf16, device) for b in batches}
    padded = (-(-args.infer_height // 32) * 32, -(-args.infer_width // 32) * 32)  # predict pads to 32
    infer_work = simulated_work(cfg, 1, *padded, args.infer_iters, False, bf16, device)
    for name in args.runners:
        runner = RUNNERS[name]
        timed, loss_fn = runner.prepare(model, args)
        for batch in [] if args.no_train or not runner.train else batches:
            work = train_work[batch]
            try:
                result = _timed_row(name, lambda: bench_train(
                    timed, cfg.max_disp, batch, args.height, args.width, args.iters, bf16, device, args.steps,
                    args.warmup, work, planned_peak_gib(cfg, work, True), loss_fn))
            except torch.cuda.OutOfMemoryError:
                result = {"runner": name, "batch": batch, "oom": True,
                          "planned_peak_gib": planned_peak_gib(cfg, train_work[batch], True)}
                torch.cuda.empty_cache()
            report["train"].append(result)
            write_report(report, out)  # after each row: a run stopped by a time limit keeps what it measured
        if not args.no_infer:
            report["infer"].append(_timed_row(name, lambda: bench_infer(
                timed, args.infer_height, args.infer_width, args.infer_iters, bf16, device, args.steps, args.warmup,
                infer_work, planned_peak_gib(cfg, infer_work, False))))
            write_report(report, out)
    if args.onnx:
        from stereo.deploy.timing import compare_cpu

        height, width = args.infer_height // 32 * 32, args.infer_width // 32 * 32
        report["onnx_cpu"] = [compare_cpu(model_config(size), height, width, args.infer_iters, args.steps,
                                          args.warmup) for size in args.onnx]
        write_report(report, out)
    print(render(report, args))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _verdict(row: dict, on_gpu: bool) -> str:
    """Measured against planned peak memory: the plan counts torch's tensors, which a GPU's allocator measures; a
    CPU's figure is the process's resident set (interpreter, libraries, and every row before), no check of it."""
    if row.get("oom"):
        return "out of memory"
    if not on_gpu:
        return "n/a (CPU: resident set)"
    error = row["plan_error"]
    return f"{'as planned' if abs(error) <= 0.10 else 'OFF PLAN'} ({error:+.0%})"


def render(report: dict, args: argparse.Namespace) -> str:
    """The table: one row per runner and configuration, rounded; the JSON file has every figure."""
    on_gpu = report["memory"].startswith("torch.cuda")
    head = (f"{report['size']} on {report['device']} ({report['threads']} threads), {report['precision']}; "
            f"training {args.height}x{args.width}, {args.iters} iterations; inference {args.infer_height}x"
            f"{args.infer_width}, {args.infer_iters} iterations; compiled: {report['backend']}"
            + (f", iteration {report['iteration_mode']}" if report["iteration_mode"] != "default" else ""))
    cols = f"  {'step':<14}{'runner':<11}{'median ms':>10}{'samples/s':>11}{'first s':>9}{'compile s':>11}" \
           f"{'peak GiB':>10}{'plan GiB':>10}  memory vs plan"
    lines = [head, "", cols]
    rows = [(f"train batch {r['batch']}", r) for r in report["train"]] + [("inference", r) for r in report["infer"]]
    for label, r in rows:
        if r.get("oom"):
            lines.append(f"  {label:<14}{r['runner']:<11}{'':>61}  {_verdict(r, on_gpu)}")
            continue
        lines.append(f"  {label:<14}{r['runner']:<11}{r['median_ms']:>10.0f}{r['samples_per_s']:>11.2f}"
                     f"{r['first_step_ms'] / 1000:>9.1f}{r['compile_s']:>11.1f}{r['peak_mem_gib']:>10.2f}"
                     f"{r['planned_peak_gib']:>10.2f}  {_verdict(r, on_gpu)}")
    for label, kind in (("training", report["train"]), ("inference", report["infer"])):
        base = {r["batch"]: r for r in kind if r["runner"] == "eager" and not r.get("oom")}
        for r in kind:
            if r["runner"] != "eager" and not r.get("oom") and r["batch"] in base:
                lines.append(f"{r['runner']} {label} (batch {r['batch']}): "
                             f"{base[r['batch']]['median_ms'] / r['median_ms']:.2f}x eager")
    if on_gpu:
        lines.append(f"released implementation on one H100: training batch 2 "
                     f"{RELEASED_H100['train_batch2']['median_ms']:.0f} ms, inference "
                     f"{RELEASED_H100['infer']['median_ms']:.0f} ms")
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
