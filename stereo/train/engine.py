"""DeepSpeed from our typed config: process group, precision, ZeRO stage, clipping, accumulation, the optimizer."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

from stereo.config import Config


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def sanitise_cuda_arch_list() -> None:
    """`TORCH_CUDA_ARCH_LIST=...;9.0a` crashes DeepSpeed's JIT op builder (int('0a')): keep 9.0, drop the suffix."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if value:
        os.environ["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d+\.\d+)[a-z]+", r"\1", value)
    # JIT-built ops (the CPU comm op, ~80 s) live in the venv: `make setup` builds them there once, and every
    # checkout that runs this venv's Python finds them (a TORCH_EXTENSIONS_DIR of your own wins)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def prebuild_ops() -> None:
    """JIT-build the op DeepSpeed always needs on a CPU machine (its shared-memory comm op) into the cache now,
    so that `make setup` pays for it once instead of the first `make train`. GPU machines build their ops at first
    use, or have them prebuilt (the Docker image)."""
    sanitise_cuda_arch_list()
    if torch.cuda.is_available():
        return
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    ShareMemCommBuilder().load()


def init_distributed() -> DistEnv:
    """torchrun sets RANK/WORLD_SIZE/MASTER_*; a bare `python -m stereo train` runs as a world of one."""
    sanitise_cuda_arch_list()
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    import deepspeed

    on_gpu = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_gpu:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False,
                               timeout=timedelta(minutes=30))
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    return DistEnv(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]), device)


def deepspeed_config(cfg: Config, world_size: int, precision: str) -> dict:
    # activation checkpointing is the model's own (cfg.model.activation_checkpointing, torch.utils.checkpoint)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        # our torch AdamW instead of DeepSpeed's fused Adam: no JIT build of that op (190 s -> 79 s on a fresh CPU box)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # progress is ours
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0,  # 0: dynamic
                      "initial_scale_power": cfg.deepspeed.fp16_initial_scale_power,
                      "loss_scale_window": cfg.deepspeed.fp16_loss_scale_window}
    return ds


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    groups = model.param_groups(cfg.optim.lr, cfg.optim.vit_lr)
    for group in groups:
        group["peak_lr"] = group["lr"]  # the schedule scales from here every step
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay)


def build_engine(model: torch.nn.Module, cfg: Config, env: DistEnv, precision: str):
    import deepspeed

    model.to(env.device)
    optimizer = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, env.world_size, precision))
    return engine


def set_learning_rate(engine, multiplier: float) -> float:
    """Scale every param group's peak lr; returns the main group's lr for logging."""
    for group in engine.optimizer.param_groups:
        group["lr"] = group["peak_lr"] * multiplier
    return engine.optimizer.param_groups[0]["lr"]
