"""Elastic resume: continue a checkpoint written by N processes with M, keeping the global batch and the data order.

What moves, and how:
* the layout (world size, per-GPU batch, accumulation) is saved with each checkpoint (`layout.json`); a resume at
  another world size keeps the global batch, setting `train.grad_accum` when that suffices and refusing (exit 2,
  naming the settings that keep it) otherwise (`keep_global_batch`);
* weights and optimizer state go through DeepSpeed's universal checkpoint: its `ds_to_universal` gathers the ZeRO
  partitions (stages 1-3, and the bf16 optimizer's) into whole per-parameter fp32 tensors, which an engine of any
  world size re-splits on load (`to_universal`). Without partitioned optimizer state (stage 0 in fp32/fp16) the
  checkpoint already holds whole tensors and loads as it is;
* the per-rank trainer states are merged (`merge_trainer_states`): step and counters from rank 0, every lane's data
  cursor from whichever rank owned it, the EMA joined (ZeRO-3) and re-split, RNG states kept for ranks that existed
  and derived from (seed, rank, step) for new ones.
"""

from __future__ import annotations

import json
import shutil
from argparse import Namespace
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from stereo.config import Config
from stereo.config.errors import ConfigError

LAYOUT_FILE = "layout.json"


@dataclass(frozen=True)
class Layout:
    world_size: int
    batch_size: int  # per process (data.batch_size)
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.grad_accum

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> "Layout":
        return cls(world_size, cfg.data.batch_size, cfg.train.grad_accum)

    def to_json(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    def describe(self) -> str:
        return (f"{self.global_batch} = data.batch_size {self.batch_size} x train.grad_accum {self.grad_accum} x "
                f"{self.world_size} process{'es' if self.world_size > 1 else ''}")


def read_layout(step_dir: Path) -> Layout | None:
    """The layout a checkpoint was written with (None: written before layouts were saved)."""
    path = Path(step_dir) / LAYOUT_FILE
    if not path.is_file():
        return None
    try:
        return Layout(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(path), f"a JSON object {{world_size, batch_size, grad_accum}}, got {exc}") from None


def ways_to_split(global_batch: int, world_size: int) -> list[tuple[int, int]]:
    """(data.batch_size, train.grad_accum) pairs that give `global_batch` over `world_size` processes."""
    if global_batch % world_size:
        return []
    per_rank = global_batch // world_size
    return [(b, per_rank // b) for b in range(1, per_rank + 1) if per_rank % b == 0]


def keep_global_batch(saved: Layout, cfg: Config, world_size: int) -> str | None:
    """Make `cfg` keep the saved global batch at `world_size` processes. When data.batch_size divides the new
    per-process share, train.grad_accum is set to make up the rest (whatever this start's config said) and the
    returned line says so; otherwise ConfigError (exit 2) names the per-GPU batch and accumulation that keep it, or
    the process counts that can."""
    now = Layout.of(cfg, world_size)
    if now.global_batch == saved.global_batch:
        return None
    if saved.global_batch % (world_size * cfg.data.batch_size) == 0:
        accum = saved.global_batch // (world_size * cfg.data.batch_size)
        line = (f"resuming at {world_size} process(es) (the checkpoint has {saved.world_size}): train.grad_accum "
                f"{cfg.train.grad_accum} -> {accum} keeps the global batch of {saved.global_batch}")
        cfg.train.grad_accum = accum
        return line
    splits = ways_to_split(saved.global_batch, world_size)
    if splits:
        options = " or ".join(f"data.batch_size={b} train.grad_accum={a}" for b, a in splits[-3:][::-1])
        fix = f"at {world_size} process(es) it is kept by {options}"
    else:
        counts = [m for m in range(1, saved.global_batch + 1) if saved.global_batch % m == 0]
        fix = (f"{world_size} processes cannot split it (it would take {saved.global_batch / world_size:g} "
               f"samples per process); resume on a process count that divides it: {', '.join(map(str, counts))}")
    raise ConfigError("train.grad_accum", f"the global batch of the checkpoint being resumed, {saved.describe()}; "
                      f"this start has {now.describe()}: {fix}")


# ---- weights and optimizer state ----------------------------------------------------------------------------------

def has_partitioned_optimizer(ds_dir: Path) -> bool:
    """ZeRO 1-3 and the bf16 optimizer save per-rank optimizer partitions; stage 0 in fp32/fp16 saves whole ones."""
    return any(Path(ds_dir).glob("*optim_states.pt"))


def to_universal(ds_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's own conversion of a ZeRO checkpoint into its universal (world-size-free) format, at out_dir."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    ds_to_universal.main(Namespace(input_folder=str(ds_dir), output_folder=str(out_dir), num_extract_workers=1,
                                   num_merge_workers=1, keep_temp_folder=False, strict=True,
                                   inject_missing_state=True))


class universal_loading:
    """While active, engine.load_checkpoint reads DeepSpeed's universal format (the `checkpoint.load_universal`
    setting, which DeepSpeed consults at load time only). The param groups' hyperparameters (lr, peak_lr, betas,
    weight decay: all from the config) are put back afterwards: DeepSpeed's stage-3 loader copies group 0's onto
    every group, which would give the ViT group the main group's peak_lr."""

    def __init__(self, engine):
        self.config, self.optimizer = engine._config, engine.optimizer

    def __enter__(self) -> None:
        self.before = self.config.load_universal_checkpoint
        self.config.load_universal_checkpoint = True
        self.groups = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]

    def __exit__(self, *exc) -> None:
        self.config.load_universal_checkpoint = self.before
        for group, saved in zip(self.optimizer.param_groups, self.groups):
            group.update(saved)


def restore_outside_optimizer(engine, step_dir: Path, tag: str) -> None:
    """Collective. The universal format restores what the optimizer holds (trainable weights and moments) and not
    the module's buffers (BatchNorm statistics) nor its frozen parameters (a frozen ViT: on a resume nothing else
    initialises them). Both are read from the checkpoint itself (the model states file; under ZeRO-3 consolidated
    by DeepSpeed's zero_to_fp32) and written into the module (under ZeRO-3 through a gather)."""
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    module = engine.module
    frozen = [(name, p) for name, p in module.named_parameters() if not p.requires_grad]
    buffers = [(name, b) for name, b in module.named_buffers() if b is not None]
    if not frozen and not buffers:
        return
    zero3 = engine.zero_optimization_partition_weights()
    if zero3:  # every parameter is partitioned: DeepSpeed consolidates them (frozen ones and buffers included)
        saved = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=tag)
    else:  # the module's whole state dict is in the model states file
        saved = torch.load(Path(step_dir) / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["module"]
    with torch.no_grad():
        if zero3:
            with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=0):
                if engine.global_rank == 0:
                    for name, p in frozen:
                        p.copy_(saved[name].to(p.dtype))
        else:
            for name, p in frozen:
                p.copy_(saved[name].to(p.dtype))
        for name, b in buffers:
            if name in saved:
                b.copy_(saved[name].to(b.dtype))


# ---- trainer state ------------------------------------------------------------------------------------------------

def merge_trainer_states(states: list[dict], rank: int, world_size: int, ema, seed: int) -> dict:
    """One trainer state for `rank` of `world_size` from the states of every rank of the checkpoint's world.

    The loader gets every rank's state (it picks its own lanes), the EMA is re-split for this rank (ZeRO-3) or
    taken whole from rank 0, the RNG state is this rank's old one where it existed, else derived from
    (seed, rank, step)."""
    from stereo.train.rng import derived_state

    first = states[0]
    merged = {**first, "world_size": world_size, "moved_from": first["world_size"],
              "loader": [s["loader"] for s in states],
              "rng": states[rank]["rng"] if rank < len(states) else derived_state(seed, rank, first["step"])}
    if ema is not None and first.get("ema") is not None:
        merged["ema"] = ema.resplit([s["ema"] for s in states]) if ema.partitioned else first["ema"]
    return merged
