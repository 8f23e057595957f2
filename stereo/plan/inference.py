"""Inference memory on one GPU: the peak of a test-mode forward at an image size, and the largest image that fits.

The forward runs on fake tensors (`stereo.plan.simulate`, cached) at the size padded to a multiple of 32, batch 1,
fp32 weights under the precision's autocast with CUDA's rules (as `infer --precision` runs it); the peak is the
weights plus the highest live activations. Hierarchical inference runs a half-resolution pass, then the full one:
its peak is the larger of the two, which is the full pass, so it needs as much memory as the default (it exists for
accuracy on large images, not memory). What lowers the peak: bf16/fp16 and a smaller `model.max_disp` (the cost
volume has max_disp / 4 disparity planes at 1/4 resolution).

The largest image keeps the given aspect ratio: the peak grows linearly with the pixels (the cost volume and the
feature maps; the ViT input stops growing at 1344 px), so two simulated sizes give the line, and the size it gives
is checked by one more simulation (and stepped down by 32 px until it fits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stereo.config.schema import ModelConfig
from stereo.plan.budget import BYTES, parameter_counts, simulated_step
from stereo.plan.gpus import Gpu


def _pad32(x: int) -> int:
    return -(-x // 32) * 32


@dataclass
class InferencePlan:
    size: str
    height: int
    width: int
    iters: int
    precision: str
    gpu: Gpu
    weights_bytes: int
    peak_bytes: int  # weights + the highest live activations (default = hierarchical, see the module doc)
    half_pass_bytes: int  # the hierarchical half-resolution pass's peak
    largest: tuple[int, int]  # (height, width) at this aspect ratio that fits the GPU

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu.usable_bytes


def _peak(cfg: ModelConfig, height: int, width: int, iters: int, precision: str, weights: int) -> int:
    step = simulated_step(cfg, 1, (_pad32(height), _pad32(width)), iters, precision, train=False, gpu=True,
                          amp=precision != "fp32")
    return weights + step["peak_bytes"]


def plan_inference(cfg: ModelConfig, height: int, width: int, iters: int, precision: str, gpu: Gpu) -> InferencePlan:
    trainable, frozen = parameter_counts(cfg)
    weights = (trainable + frozen) * BYTES["fp32"]  # inference keeps fp32 weights; autocast lowers activations
    peak = _peak(cfg, height, width, iters, precision, weights)
    half = _peak(cfg, max(32, height // 2), max(32, width // 2), iters, precision, weights)
    # the line through two sizes of this aspect ratio, in pixels (the second one 256 px on its long side, or twice
    # the image where that is too close to it)
    ref_scale = 256 / max(height, width)
    ref_scale = 2.0 if abs(ref_scale - 1) < 0.25 else ref_scale
    ref = (max(32, round(height * ref_scale)), max(32, round(width * ref_scale)))
    ref_peak = _peak(cfg, *ref, iters, precision, weights)
    ref_pixels = _pad32(ref[0]) * _pad32(ref[1])
    pixels = _pad32(height) * _pad32(width) - ref_pixels
    slope = (peak - ref_peak) / pixels if pixels else 0.0
    scale = math.sqrt(max(0.0, (gpu.usable_bytes - ref_peak) / max(slope, 1e-9) + ref_pixels) / (height * width))
    best = (int(height * scale) // 32 * 32, int(width * scale) // 32 * 32)
    while min(best) > 32 and _peak(cfg, *best, iters, precision, weights) > gpu.usable_bytes:
        best = (best[0] - 32, max(32, round((best[0] - 32) * width / height) // 32 * 32))
    return InferencePlan(cfg.size, height, width, iters, precision, gpu, weights, peak, half, best)


def render(plan: InferencePlan, max_disp: int) -> str:
    gib = 2**30
    gpu = plan.gpu
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    return "\n".join([
        f"inference: {plan.size}, {plan.width}x{plan.height} (padded {_pad32(plan.width)}x{_pad32(plan.height)}), "
        f"{plan.iters} iterations, {plan.precision}, max_disp {max_disp}, batch 1 (sizes: width x height)",
        f"{gpu.name}: {gpu.memory_bytes / gib:.1f} GiB, {gpu.usable_bytes / gib:.1f} GiB usable",
        f"  {'weights (fp32)':<44}{plan.weights_bytes / gib:>8.2f}",
        f"  {'peak, default':<44}{plan.peak_bytes / gib:>8.2f}   {verdict}",
        f"  {'peak, hierarchical (half pass, then full)':<44}{max(plan.peak_bytes, plan.half_pass_bytes) / gib:>8.2f}"
        f"   {verdict} (half pass alone {plan.half_pass_bytes / gib:.2f})",
        f"largest image that fits at this aspect ratio: {plan.largest[1]}x{plan.largest[0]} (default and "
        f"hierarchical alike: the full-resolution pass sets the peak)",
    ])
