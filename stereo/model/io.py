"""Weights in the released FoundationStereo format, and the start of training (`initialise`).

Released `model_best_bp2.pth`: `{"model": state_dict, "global_step": int, "epoch": int}`. We read that, a bare
state dict, DDP's `module.` prefix and `.safetensors`, always with strict key and shape checks that name every
offending key. Our exports add an optional `"config"` (the resolved config tree); released loaders ignore it.
The released inference script builds its model from a `cfg.yaml` in the checkpoint's folder, so exports write
one there too (one model per folder, as released).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from stereo.config.errors import ConfigError
from stereo.config.schema import ModelConfig
from stereo.model.pretrained import WeightMismatchError, load_pretrained, read_state_dict

DDP_PREFIX = "module."


def strip_ddp_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(DDP_PREFIX) for k in state):
        return {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    return state


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict without any `module.` prefix, embedded config tree or None) of a .pth/.pt/.safetensors file."""
    path = Path(path)
    state = strip_ddp_prefix(read_state_dict(path))
    config = None
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("config")
        config = json.loads(text) if text else None
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no second full read
        if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
            config = obj["config"]
    return state, config


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise WeightMismatchError listing missing, unexpected and wrong-shaped keys (nothing is loaded then)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                   if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        raise WeightMismatchError(source, missing, unexpected, wrong_shape)


def load_released(model: nn.Module, path: str | Path) -> None:
    """Every weight of `model` (the frozen ViT included) from a released checkpoint or one of our exports."""
    state, _ = read_checkpoint(path)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    model.feature.vit_initialised_from = str(path)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as open() would create it; safetensors writes 0600
    os.replace(tmp, path)


# The released `cfg.yaml` (folder 23-51-11): keys that are also ours, and the architecture it fixes.
RELEASED_SHARED_KEYS = ("max_disp", "hidden_dims", "corr_radius", "corr_levels", "train_iters", "valid_iters")
RELEASED_FIXED = {"n_gru_layers": 3, "n_downsample": 2, "corr_implementation": "reg", "mixed_precision": True,
                  "low_memory": 0}
RELEASED_ARCHITECTURE = ("n_gru_layers", "n_downsample")  # the fixed keys that a loaded file must match


def released_cfg(cfg: ModelConfig) -> dict:
    """The model keys of the released `cfg.yaml` for this model."""
    shared = {key: getattr(cfg, key) for key in RELEASED_SHARED_KEYS}
    return {"vit_size": cfg.size, **shared, "hidden_dims": list(cfg.hidden_dims), **RELEASED_FIXED}


def read_released_cfg(checkpoint: str | Path) -> ModelConfig | None:
    """The model described by the released-layout `cfg.yaml` beside `checkpoint`, or None when there is none."""
    path = Path(checkpoint).parent / "cfg.yaml"
    if not path.is_file():
        return None
    raw = yaml.safe_load(path.read_text()) or {}
    for key in RELEASED_ARCHITECTURE:
        supported = RELEASED_FIXED[key]
        if raw.get(key, supported) != supported:
            raise ConfigError(key, f"{supported} (the released architecture), got {raw[key]!r}", source=str(path))
    cfg = ModelConfig(size=raw.get("vit_size", "vitl"))  # the released script's default
    if cfg.size not in ("tiny", "vits", "vitb", "vitl"):
        raise ConfigError("vit_size", f"one of vits, vitb, vitl (or our tiny), got {cfg.size!r}", source=str(path))
    for key in RELEASED_SHARED_KEYS:
        if key in raw:
            default = getattr(cfg, key)
            if type(raw[key]) is not type(default) or (isinstance(default, list)
                                                       and not all(type(v) is int for v in raw[key])):
                raise ConfigError(key, f"like {default!r}, got {raw[key]!r}", source=str(path))
            setattr(cfg, key, raw[key])
    try:
        cfg.validate()
    except ConfigError as err:
        raise err.with_source(str(path)) from None
    return cfg


def export_released(model: nn.Module, path: str | Path, global_step: int, epoch: int, *,
                    config: dict | None = None, safetensors: bool = False) -> list[Path]:
    """Write `{"model", "global_step", "epoch"[, "config"]}` (fp32 tensors on the CPU) to `path` and the released
    `cfg.yaml` beside it; with `safetensors`, also `path` with suffix .safetensors. Returns the files written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload: dict = {"model": state, "global_step": int(global_step), "epoch": int(epoch)}
    if config is not None:
        payload["config"] = config
    _atomic_write(path, lambda p: torch.save(payload, p))
    cfg_path = path.parent / "cfg.yaml"
    _atomic_write(cfg_path, lambda p: p.write_text(yaml.safe_dump(released_cfg(model.cfg), sort_keys=False)))
    written = [path, cfg_path]
    if safetensors:
        st_path = path.with_suffix(".safetensors")
        # safetensors refuses aliased tensors (ResidualBlock.norm3 is also downsample.1): one copy per key.
        tensors = {k: v.contiguous().clone() for k, v in state.items()}
        metadata = {"global_step": str(global_step), "epoch": str(epoch)}
        if config is not None:
            metadata["config"] = json.dumps(config)
        _atomic_write(st_path, lambda p: save_file(tensors, str(p), metadata=metadata))
        written.append(st_path)
    return written


def initialise(model: nn.Module, cfg: ModelConfig) -> None:
    """Starting weights for training: `cfg.init_from` (released checkpoint or our export) when set, else the
    backbone files of `cfg.pretrained`. A frozen ViT that stays random is refused unless allowed explicitly."""
    if cfg.init_from:
        load_released(model, cfg.init_from)
        return
    load_pretrained(model, cfg.pretrained)
