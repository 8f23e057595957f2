"""DeepSpeed from our typed config: process group, precision, ZeRO stage, clipping, accumulation, the optimizer."""

from __future__ import annotations

import os
import re
import socket
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


def import_deepspeed():
    """`import deepspeed` without the `import mlflow` of its autotuner (which we never run): MLflow's import is most
    of DeepSpeed's (2 s idle, 8 s on a loaded node; docs/cluster.md "Restart time"). A run that logs to MLflow
    imports it where it logs."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # makes `import mlflow` raise ImportError: DeepSpeed then runs without it
        try:
            import deepspeed
        finally:
            if sys.modules.get("mlflow", 0) is None:
                del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


def init_distributed() -> DistEnv:
    """torchrun sets RANK/WORLD_SIZE/MASTER_*; a bare `python -m stereo train` runs as a world of one."""
    sanitise_cuda_arch_list()
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:  # a world of one: any free port (a fixed formula collides with neighbours)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    deepspeed = import_deepspeed()

    on_gpu = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_gpu:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False,
                               timeout=timedelta(minutes=30))
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    return DistEnv(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]), device)


def guards_gradients(cfg: Config, precision: str) -> bool:
    """ZeRO stage 0 in fp32 hands our optimizer the gradients directly: no DeepSpeed check of their norm there."""
    return cfg.deepspeed.zero_stage == 0 and precision == "fp32"


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that clips by the global norm and skips the update when that norm is not finite, reporting both the
    way DeepSpeed's own optimizers do (`_global_grad_norm`, `overflow`), so `engine.was_step_applied()` and the
    logged grad_norm mean the same at every ZeRO stage. Used where DeepSpeed does neither (guards_gradients)."""

    def __init__(self, params, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self.overflow = False
        self._global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        self._global_grad_norm = float(norm)  # the step's one host sync, as DeepSpeed's overflow check has
        self.overflow = not torch.isfinite(norm).item()
        if self.overflow:
            return None
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm)
        return super().step(closure)


def grad_norm(engine) -> float | None:
    """The last step's global gradient norm before clipping (None where it is unknown)."""
    value = engine.get_global_grad_norm()
    if value is None:
        value = getattr(engine.optimizer, "_global_grad_norm", None)
    return float(value) if value is not None else None


def deepspeed_config(cfg: Config, world_size: int, precision: str) -> dict:
    # activation checkpointing is the model's own (cfg.model.activation_checkpointing, torch.utils.checkpoint)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": 0.0 if guards_gradients(cfg, precision) else cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        # our torch AdamW instead of DeepSpeed's fused Adam: no JIT build of that op (190 s -> 79 s on a fresh CPU box)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # progress is ours
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        # torch's fused CPU AdamW steps the offloaded fp32 partitions: DeepSpeedCPUAdam would need a C++ build
        ds["zero_force_ds_cpu_optimizer"] = False
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0,  # 0: dynamic
                      "initial_scale_power": cfg.deepspeed.fp16_initial_scale_power,
                      "loss_scale_window": cfg.deepspeed.fp16_loss_scale_window}
    return ds


def build_optimizer(model: torch.nn.Module, cfg: Config, precision: str) -> torch.optim.Optimizer:
    groups = model.param_groups(cfg.optim.lr, cfg.optim.vit_lr)
    for group in groups:
        group["peak_lr"] = group["lr"]  # the schedule scales from here every step
    kwargs = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    if guards_gradients(cfg, precision):
        return GuardedAdamW(groups, max_norm=cfg.optim.grad_clip, **kwargs)
    return torch.optim.AdamW(groups, fused=cfg.deepspeed.offload_optimizer or None, **kwargs)


def build_engine(model: torch.nn.Module, cfg: Config, env: DistEnv, precision: str):
    deepspeed = import_deepspeed()

    model.to(env.device)
    optimizer = build_optimizer(model, cfg, precision)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, env.world_size, precision))
    return engine


def set_learning_rate(engine, multiplier: float) -> float:
    """Scale every param group's peak lr; returns the main group's lr for logging."""
    for group in engine.optimizer.param_groups:
        group["lr"] = group["peak_lr"] * multiplier
    return engine.optimizer.param_groups[0]["lr"]
