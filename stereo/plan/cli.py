"""`python -m stereo plan CONFIG [a.b=value ...] [--gpu NAME] [--gpus N]`: per-GPU memory and time floor of a
training config, planned on the CPU before any GPU is involved. With `--infer HxW [--precision P]`: the inference
memory of the config's model at that image size, and the largest image that fits (stereo.plan.inference)."""

from __future__ import annotations

import json
import sys

from stereo.config import load_config
from stereo.config.errors import ConfigError
from stereo.plan.budget import BYTES, DEEPSPEED_REDUCE_BUCKET, Plan, make_plan
from stereo.plan.gpus import GIB, GPUS


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a file under configs/ (name or path)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, type-checked")
    parser.add_argument("--gpu", choices=sorted(GPUS), help="the GPU to plan for (default: the config's slurm.gpu)")
    parser.add_argument("--gpus", type=int, help="data-parallel GPUs (default: slurm.nodes x slurm.gpus_per_node)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--infer", metavar="HxW", help="plan inference at this image size instead (e.g. 2000x2900)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="inference autocast (--infer; default fp32)")
    parser.add_argument("--iters", type=int, help="inference GRU iterations (--infer; default model.valid_iters)")


def image_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError("--infer", f"HEIGHTxWIDTH in pixels, e.g. 2000x2900, got {text!r}") from None
    if min(height, width) < 32:
        raise ConfigError("--infer", f"sides of at least 32 px, got {text!r}")
    return height, width


def render(plan: Plan) -> str:
    gpu = plan.gpu
    zero = f"ZeRO-{plan.zero_stage}" + (f" over {plan.world_size} GPUs" if plan.world_size > 1 else " on 1 GPU")
    rows = [(f"{name}", size) for name, size in plan.states.items()]
    bucket = DEEPSPEED_REDUCE_BUCKET * BYTES[plan.precision]
    lines = [f"{plan.config}: {plan.size}, crop {plan.crop[0]}x{plan.crop[1]}, {plan.iters} iterations, "
             f"{plan.precision}, batch {plan.batch} per GPU, {zero}",
             f"{gpu.name}: {gpu.memory_bytes / GIB:.1f} GiB, {gpu.usable_bytes / GIB:.1f} GiB usable "
             f"(less CUDA context, NCCL, workspaces, fragmentation)",
             "",
             f"  {'per GPU':<44}{'GiB':>8}"]
    lines += [f"  {name:<44}{size / GIB:>8.2f}" for name, size in rows]
    lines += [f"  {'model states':<44}{plan.static_bytes / GIB:>8.2f}",
              f"  {'activations per sample (kept for backward)':<44}{plan.activations_per_sample / GIB:>8.2f}",
              f"  {f'step peak above the model states, batch {plan.batch}':<44}{plan.step_peak_bytes / GIB:>8.2f}",
              f"  {f'peak, batch {plan.batch}':<44}{plan.peak_bytes / GIB:>8.2f}"
              f"   {'fits' if plan.fits else 'DOES NOT FIT'}",
              *([f"  {'host memory per rank (offloaded optimizer)':<44}{plan.host_bytes / GIB:>8.2f}"]
                if plan.host_bytes else []),
              *([f"  (gradients: {(plan.states['gradients'] - bucket) / GIB:.2f} GiB for the trainable weights + "
                 f"{bucket / GIB:.2f} GiB of ZeRO-{plan.zero_stage}'s reduce bucket, {DEEPSPEED_REDUCE_BUCKET:,} "
                 f"elements whatever the model's size)"] if plan.zero_stage in (1, 2) else []),
              "",
              f"largest batch per GPU that fits: {plan.max_batch}",
              f"parameters: {plan.trainable_params / 1e6:.1f} M trainable, {plan.frozen_params / 1e6:.1f} M frozen"]
    floor = plan.time_floor_s
    work = f"{plan.flops / 1e12:.1f} TFLOP and {plan.operators:,} operators per step"
    if floor is None:
        lines.append(f"time floor: unknown peak for {gpu.device_name} ({work})")
    else:
        lines.append(f"time floor per step: {1000 * floor:.0f} ms ({work} at {gpu.peak_tflops:.0f} TFLOP/s; "
                     f"at most {plan.batch / floor:.1f} samples/s per GPU)")
    lines.append(f"(the step's simulation read from ~/.cache/stereo/plans, where a plan made it in "
                 f"{plan.simulate_s:.1f} s)" if plan.cached else
                 f"(the step simulated on fake tensors in {plan.simulate_s:.1f} s; cached in ~/.cache/stereo/plans)")
    return "\n".join(lines)


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    gpu = GPUS[args.gpu or cfg.slurm.gpu]
    if args.infer:
        from stereo.plan.inference import plan_inference, render as render_inference

        plan = plan_inference(cfg.model, *image_size(args.infer), args.iters or cfg.model.valid_iters,
                              args.precision, gpu)
        print(render_inference(plan, cfg.model.max_disp))
        return 0
    world_size = args.gpus or max(1, cfg.slurm.nodes * cfg.slurm.gpus_per_node)
    plan = make_plan(cfg, world_size, gpu, config_name=args.config)
    print(json.dumps(plan.to_json(), indent=2) if args.json else render(plan))
    if not plan.fits:
        print(f"does not fit: lower data.batch_size (largest that fits: {plan.max_batch}) or turn on "
              f"model.activation_checkpointing.*", file=sys.stderr)
    return 0
