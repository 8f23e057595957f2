"""`python -m stereo export RUN_DIR --out model.pth [--ema] [--step N]`: a run's weights in the released format.

Reads the newest complete checkpoint (or --step), consolidates the weights for any ZeRO stage (DeepSpeed's
fp32 master copy where ZeRO partitioned it, the module state otherwise), optionally puts the EMA weights in,
and writes `model.pth` (`{"model", "global_step", "epoch"}` through stereo.model.io.export_released) plus
`model.safetensors` next to it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

from stereo.config import from_dict, to_dict
from stereo.train.checkpoint import DS_TAG, find_checkpoint, trainer_state_path


def consolidated_state_dict(step_dir: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """(full fp32 state dict, rank 0's trainer state) of one complete checkpoint directory."""
    ds_dir = step_dir / DS_TAG
    model_states = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    state = dict(model_states.get("module") or {})
    if any(ds_dir.glob("*zero_pp_rank_*optim_states.pt")):  # ZeRO 1-3: the fp32 masters live in the partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state.update(get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DS_TAG))
    trainer_state = torch.load(trainer_state_path(step_dir, 0), map_location="cpu", weights_only=False)
    if use_ema:
        if trainer_state.get("ema") is None:
            raise ValueError(f"{step_dir}: --ema requested but this run kept no EMA (train.ema_decay was null)")
        state.update(trainer_state["ema"]["shadow"])
    return {k: v.detach().float() if v.is_floating_point() else v for k, v in state.items()}, trainer_state


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory (with checkpoints/ and config.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="released-format checkpoint to write (.pth)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the live ones")
    parser.add_argument("--step", type=int, default=None, help="a specific complete checkpoint (default: newest)")


def run(args) -> int:
    from stereo.model import build_model
    from stereo.model.io import export_released

    step_dir = find_checkpoint(args.run_dir, args.step)
    state, trainer_state = consolidated_state_dict(step_dir, args.ema)
    cfg = from_dict(yaml.safe_load(trainer_state["config"]), source=f"{step_dir} (embedded config)")
    model = build_model(cfg.model)
    model.load_state_dict(state, strict=True)  # refuses a checkpoint that does not match its own config
    epoch = trainer_state["loader"].get("epoch", 0) if isinstance(trainer_state["loader"], dict) else 0
    written = export_released(model, args.out, global_step=trainer_state["step"], epoch=epoch,
                              config=to_dict(cfg), safetensors=True)
    print(f"exported {step_dir} ({'EMA' if args.ema else 'live'} weights, step {trainer_state['step']}) -> "
          f"{', '.join(map(str, written))}", file=sys.stderr)
    return 0
