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
from stereo.train.ema import join_partitions


def read_trainer_state(step_dir: Path) -> dict:
    """Rank 0's trainer state: step, EMA, the resolved config the run trained with, ..."""
    return torch.load(trainer_state_path(step_dir, 0), map_location="cpu", weights_only=False)


def read_ema(step_dir: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The EMA weights of a checkpoint, whole: rank 0's copy, or every rank's ZeRO-3 shard joined."""
    ema = read_trainer_state(step_dir).get("ema")
    if ema is None:
        raise ValueError(f"{step_dir}: --ema requested but this run kept no EMA (train.ema_decay was null)")
    if not ema.get("partitioned", False):
        return ema["shadow"]
    ranks = len(list(step_dir.glob("trainer_state_rank*.pt")))
    shards = [torch.load(trainer_state_path(step_dir, r), map_location="cpu", weights_only=False)["ema"]["shadow"]
              for r in range(ranks)]
    return join_partitions(shards, {name: shapes[name] for name in ema["shadow"]})


def load_checkpoint_weights(model: torch.nn.Module, step_dir: Path, use_ema: bool) -> None:
    """Put one complete checkpoint's weights (fp32) into `model`.

    Layers: the module state DeepSpeed saved (everything under ZeRO 0-2), then the fp32 masters from the ZeRO
    partitions (ZeRO 1-3; the only full copy under ZeRO-3), then the EMA with `use_ema`. Values are copied into
    the model's own tensors, so keys that alias one tensor (a module registered under two names) stay equal.
    """
    ds_dir = step_dir / DS_TAG
    # ZeRO 0-2: mp_rank_00_model_states.pt; ZeRO-3: one per rank, zero_pp_rank_<r>_mp_rank_00_model_states.pt
    # (the buffers are whole in each, the parameters empty placeholders)
    states_file = min(ds_dir.glob("*mp_rank_00_model_states.pt"), key=lambda p: len(p.name))
    model_states = torch.load(states_file, map_location="cpu", weights_only=False)
    layers = [model_states.get("module") or {}]
    if any(ds_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        layers.append(get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DS_TAG))
    model.float()
    targets = model.state_dict(keep_vars=True)
    if use_ema:
        layers.append(read_ema(step_dir, {key: t.shape for key, t in targets.items()}))
    covered: set[int] = set()
    with torch.no_grad():
        for layer in layers:
            for key, value in layer.items():
                if key not in targets:
                    raise KeyError(f"{step_dir}: weight {key!r} is not in the model built from its config")
                if value.numel() == targets[key].numel():  # ZeRO-3's module state holds empty placeholders
                    targets[key].copy_(value.reshape(targets[key].shape))
                    covered.add(id(targets[key]))
    missing = [key for key, tensor in targets.items() if id(tensor) not in covered]
    if missing:
        raise KeyError(f"{step_dir}: no saved value for {len(missing)} weights, e.g. {missing[:5]}")


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory (with checkpoints/ and config.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="released-format checkpoint to write (.pth)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the live ones")
    parser.add_argument("--step", type=int, default=None, help="a specific complete checkpoint (default: newest)")
    parser.add_argument("--mlflow", action="store_true",
                        help="also attach the written files to the run's MLflow run (artifacts under export/)")


def run(args) -> int:
    from stereo.model import build_model
    from stereo.model.io import export_released

    step_dir = find_checkpoint(args.run_dir, args.step)
    trainer_state = read_trainer_state(step_dir)
    cfg = from_dict(yaml.safe_load(trainer_state["config"]), source=f"{step_dir} (embedded config)")
    model = build_model(cfg.model)
    load_checkpoint_weights(model, step_dir, args.ema)
    epoch = trainer_state["loader"].get("epoch", 0) if isinstance(trainer_state["loader"], dict) else 0
    written = export_released(model, args.out, global_step=trainer_state["step"], epoch=epoch,
                              config=to_dict(cfg), safetensors=True)
    print(f"exported {step_dir} ({'EMA' if args.ema else 'live'} weights, step {trainer_state['step']}) -> "
          f"{', '.join(map(str, written))}", file=sys.stderr)
    if args.mlflow:
        from stereo.train.trackers import MlflowTracker

        tracker = MlflowTracker(args.run_dir, cfg, [], None, training=False)
        tracker.log_files(list(map(Path, written)), "export")
        print(f"attached to MLflow run {tracker.run_id} ({tracker.uri}) under export/", file=sys.stderr)
    return 0
