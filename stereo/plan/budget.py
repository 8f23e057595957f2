"""A training config's per-GPU memory and time floor: model states by accounting, activations by simulation.

Model states follow DeepSpeed as `stereo.train.engine` configures it (our torch AdamW, ZeRO stage from the config,
default bucket sizes). With bf16/fp16 DeepSpeed casts the whole module (frozen part included) and, from ZeRO-1 on,
keeps an fp32 master copy of the trainable weights next to AdamW's two fp32 moments; ZeRO-1 partitions those over the
data-parallel ranks, ZeRO-2 the gradients too, ZeRO-3 the weights (and the EMA, which follows their partitions).
ZeRO-1/2 also allocate a gradient bucket of `reduce_bucket_size` elements. Activations, the step's transient peak,
its FLOPs and its operators come from running the step on fake tensors (`stereo.plan.simulate`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from stereo.config.errors import ConfigError
from stereo.config.schema import Config, ModelConfig
from stereo.plan.gpus import GIB, Gpu

# deepspeed zero_optimization.reduce_bucket_size default (stereo.train.engine leaves it), elements
DEEPSPEED_REDUCE_BUCKET = 500_000_000
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SIMULATED_SOURCES = ("stereo/model", "stereo/plan/simulate.py", "stereo/train/loss.py")


@dataclass
class Plan:
    config: str
    size: str
    crop: tuple[int, int]
    iters: int
    precision: str
    zero_stage: int
    world_size: int
    gpu: Gpu
    batch: int
    trainable_params: int
    frozen_params: int  # buffers included
    states: dict[str, int]  # bytes per GPU: frozen weights, trainable weights, gradients, optimizer states, EMA
    host_bytes: int  # per rank in host memory: the offloaded optimizer partition (deepspeed.offload_optimizer)
    kept_bytes: int  # activations kept for backward at `batch` (measured)
    step_peak_bytes: int  # the step's highest transient memory above the model states at `batch` (measured)
    flops: int  # one step at `batch`, recomputation included
    operators: int
    simulate_s: float
    cached: bool = False  # the simulation was read from the cache (made by an earlier plan, perhaps another checkout)

    @property
    def static_bytes(self) -> int:
        return sum(self.states.values())

    @property
    def peak_bytes(self) -> int:
        return self.static_bytes + self.step_peak_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu.usable_bytes

    @property
    def activations_per_sample(self) -> float:
        return self.kept_bytes / self.batch

    @property
    def max_batch(self) -> int:
        """Largest batch per GPU whose peak fits, extrapolating the measured step linearly in the batch."""
        return max(0, math.floor((self.gpu.usable_bytes - self.static_bytes) / (self.step_peak_bytes / self.batch)))

    @property
    def time_floor_s(self) -> float | None:
        """The step at the GPU's dense peak (bf16/fp16; fp32 on TF32 tensor cores, half that rate)."""
        peak = self.gpu.peak_tflops
        if peak is None:
            return None
        return self.flops / (peak * 1e12 / (2 if self.precision == "fp32" else 1))

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(gpu=dataclasses.asdict(self.gpu), usable_bytes=self.gpu.usable_bytes,
                   static_bytes=self.static_bytes, peak_bytes=self.peak_bytes, fits=self.fits,
                   activations_per_sample=self.activations_per_sample, max_batch=self.max_batch,
                   time_floor_s=self.time_floor_s)
        return out


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(trainable, frozen + buffers) element counts, from the model built on the meta device."""
    import torch

    from stereo.model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen + sum(b.numel() for b in model.buffers())


def model_states(trainable: int, frozen: int, precision: str, zero_stage: int, world_size: int,
                 ema: bool, offload: bool = False) -> dict[str, int]:
    """Bytes per GPU of what lives for the whole run (offload: the fp32 partition lives in host memory instead,
    `host_optimizer_bytes`)."""
    p, n = BYTES[precision], world_size
    weights_share = 1 / n if zero_stage == 3 else 1
    grads = trainable * p / (n if zero_stage >= 2 else 1)
    if zero_stage in (1, 2):
        grads += DEEPSPEED_REDUCE_BUCKET * p
    if zero_stage >= 1:  # fp32 partition: master copy, its gradient, AdamW's two moments
        optimizer = 0 if offload else host_optimizer_bytes(trainable, world_size)
    elif precision == "bf16":  # DeepSpeed runs the optimizer on the bf16 weights themselves: bf16 moments
        optimizer = trainable * 2 * p
    elif precision == "fp16":  # DeepSpeed's fp16 optimizer: fp32 master, its gradient and the moments
        optimizer = trainable * 16
    else:
        optimizer = trainable * 8
    return {"frozen weights": int(frozen * p * weights_share),
            "trainable weights": int(trainable * p * weights_share),
            "gradients": int(grads),
            "optimizer states": int(optimizer),
            "EMA": int(trainable * 4 * weights_share) if ema else 0}


def host_optimizer_bytes(trainable: int, world_size: int) -> int:
    """The fp32 partition per rank under ZeRO-1/2/3: master copy, its gradient, AdamW's two moments."""
    return trainable * 16 // world_size


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stereo" / "plans"


def _sources_digest() -> str:
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for entry in SIMULATED_SOURCES:
        path = root / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.read_bytes())
    return digest.hexdigest()


def simulated_step(cfg: ModelConfig, batch: int, crop: tuple[int, int], iters: int, precision: str,
                   train: bool = True, gpu: bool = True, amp: bool = False) -> dict:
    """`simulate_step` (on a GPU's autocast rules by default) as a dict, cached per model config, shape, precision,
    torch version and source of the simulated code: every rank of every requeue would otherwise pay it again."""
    import torch

    key = json.dumps([dataclasses.asdict(cfg), batch, crop, iters, precision, train, gpu, amp, torch.__version__,
                      _sources_digest()], sort_keys=True)
    path = _cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    from stereo.plan.simulate import simulate_step

    start = time.perf_counter()
    profile = simulate_step(cfg, batch, *crop, iters, precision, train=train, gpu=gpu, amp=amp)
    result = {**dataclasses.asdict(profile), "simulate_s": time.perf_counter() - start}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)  # atomic: ranks starting together may write the same entry
    return {**result, "cached": False}


def make_plan(cfg: Config, world_size: int, gpu: Gpu, config_name: str | None = None) -> Plan:
    """The per-GPU plan of `cfg` trained on `world_size` GPUs of this kind (precision resolved as on a GPU)."""
    import torch

    from stereo.model.precision import resolve_precision

    precision = resolve_precision(cfg.train.precision, torch.device("cuda"), "train.precision")
    crop = (cfg.augment.crop[0], cfg.augment.crop[1])
    step = simulated_step(cfg.model, cfg.data.batch_size, crop, cfg.model.train_iters, precision)
    trainable, frozen = parameter_counts(cfg.model)
    offload = cfg.deepspeed.offload_optimizer
    states = model_states(trainable, frozen, precision, cfg.deepspeed.zero_stage, world_size,
                          ema=cfg.train.ema_decay is not None, offload=offload)
    return Plan(config=config_name or cfg.name, size=cfg.model.size, crop=crop, iters=cfg.model.train_iters,
                precision=precision, zero_stage=cfg.deepspeed.zero_stage, world_size=world_size, gpu=gpu,
                batch=cfg.data.batch_size, trainable_params=trainable, frozen_params=frozen, states=states,
                host_bytes=host_optimizer_bytes(trainable, world_size) if offload else 0,
                kept_bytes=step["kept_bytes"], step_peak_bytes=step["peak_bytes"], flops=step["flops"],
                operators=step["operators"], simulate_s=step["simulate_s"], cached=step["cached"])


def check_fits(cfg: Config, world_size: int, gpu: Gpu) -> Plan | None:
    """Refuse (ConfigError, exit 2) a config whose planned peak exceeds this GPU's usable memory; `train.check_memory:
    false` skips the check. Returns the plan when it was made."""
    if not cfg.train.check_memory:
        return None
    plan = make_plan(cfg, world_size, gpu)
    if not plan.fits:
        parts = ", ".join(f"{name} {size / GIB:.2f}" for name, size in plan.states.items())
        raise ConfigError("data.batch_size", (
            f"a batch that fits the GPU: at {plan.batch} per GPU the planned peak is {plan.peak_bytes / GIB:.1f} GiB "
            f"on {gpu.name} ({gpu.memory_bytes / GIB:.1f} GiB, {gpu.usable_bytes / GIB:.1f} usable): model states "
            f"{plan.static_bytes / GIB:.1f} GiB ({parts}) + the step's activations "
            f"{plan.step_peak_bytes / GIB:.1f} GiB ({plan.activations_per_sample / GIB:.2f} GiB per sample kept for "
            f"backward). The largest batch that fits is {plan.max_batch}; or turn on "
            f"model.activation_checkpointing.*; `make plan` shows the figures; train.check_memory=false starts anyway"),
            source=cfg.name)
    return plan
