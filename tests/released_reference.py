"""Golden outputs of the released FoundationStereo implementation, and how they were made.

The released code cannot run in CI (it fetches its backbones and needs timm), so its outputs for one fixed case are
stored in `tests/data/released_vits_golden.npz` and `test_released_equality.py` checks ours against them. The case
uses weights drawn from a seeded generator in state-dict order (identical in both implementations, and independent
of either one's initialisers), so only the outputs need storing, not the 62M weights.

Regenerate (a machine with network for the pip install; nothing else is downloaded):

    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 timm==1.0.12 omegaconf==2.3.0
    git clone https://github.com/NVlabs/FoundationStereo /tmp/fs
    git clone https://github.com/facebookresearch/dinov2 /tmp/dinov2
    /tmp/refvenv/bin/python tests/released_reference.py --official /tmp/fs --dinov2 /tmp/dinov2 \
        --out tests/data/released_vits_golden.npz

(timm imports torchvision, which has no CPU build for torch 2.13: put a stub package that provides what timm's
import needs on PYTHONPATH.) The released model runs in float64, so the golden values carry no float32 error of
their own.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

GOLDEN = Path(__file__).resolve().parent / "data" / "released_vits_golden.npz"
SIZE = "vits"
HEIGHT, WIDTH, ITERS, SEED = 64, 96, 3, 0
# Trainable parameters whose whole gradient is stored (small ones, one per part of the model); the others
# are checked through their gradient norms.
GRAD_KEYS = ("feature.stem.0.weight", "feature.stages.2.blocks.0.conv_dw.weight",
             "feature.stages.1.downsample.1.weight", "proj_cmb.weight", "corr_stem.0.weight",
             "cost_agg.atts.4.sa.0.self_attn.q_proj.weight", "cost_agg.conv_out.0.conv1.0.weight",
             "classifier.2.weight", "cnet.conv2.bn.weight", "update_block.encoder.convc1.bias",
             "update_block.gru08.large_gru.convz.bias", "spx_gru.0.weight")


def seeded_state_dict(state: dict[str, torch.Tensor], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Random but well-scaled values for every entry, drawn in state-dict order: fan-in scaled weights, norm scales
    near 1, small biases, positive running variances. Integer counters are kept."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            out[key] = tensor.clone()
            continue
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float64)
        name = key.rsplit(".", 1)[-1]
        if name == "running_var":
            value = 0.5 + noise.abs()
        elif tensor.dim() >= 2:
            value = noise / math.sqrt(max(tensor[0].numel(), 1))
        elif name in ("weight", "temperature"):
            value = 1.0 + 0.1 * noise
        else:  # biases, running means, layer-scale gammas
            value = 0.1 * noise
        out[key] = value.to(tensor.dtype)
    return out


def golden_inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A left image and a right one shifted by 5 px plus noise, RGB 0..255."""
    gen = torch.Generator().manual_seed(SEED + 1)
    left = torch.rand(1, 3, HEIGHT, WIDTH, generator=gen, dtype=torch.float64) * 255
    noise = torch.rand(1, 3, HEIGHT, WIDTH, generator=gen, dtype=torch.float64) * 20
    right = (torch.roll(left, shifts=-5, dims=-1) * 0.9 + noise).clamp(0, 255)
    return left.to(dtype), right.to(dtype)


def weighted_sum(t: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient differs per pixel (a plain mean cancels out in the BatchNorm backward)."""
    gen = torch.Generator().manual_seed(t.numel())
    return (t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)).mean()


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def freeze_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


Pair = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def run_cases(model: nn.Module, dtype: torch.dtype, hierarchical: Pair) -> dict[str, np.ndarray]:
    """The cases, each from the seeded weights: eval (test mode); hierarchical inference (`hierarchical(left,
    right)` on a 60x90 crop, so that both passes pad); train mode with batch statistics (forward); train mode with
    frozen BatchNorm (forward and gradients; well conditioned enough to compare in float32)."""
    seeded = seeded_state_dict(model.state_dict())
    left, right = golden_inputs(dtype)
    disable_dropout(model)
    out = {}

    model.load_state_dict(seeded)
    model.eval()
    with torch.no_grad():
        out["test_disp"] = model(left, right, iters=ITERS, test_mode=True)
        out["hierarchical_disp"] = hierarchical(left[..., :60, :90], right[..., :60, :90])

    model.load_state_dict(seeded)
    model.train()
    with torch.no_grad():
        init, preds = model(left, right, iters=ITERS, test_mode=False)
    out["train_init"], out["train_preds"] = init, torch.stack(preds)

    model.load_state_dict(seeded)
    model.train()
    freeze_batchnorm(model)
    init, preds = model(left, right, iters=ITERS, test_mode=False)
    (weighted_sum(init) + sum(weighted_sum(p) for p in preds)).backward()
    params = dict(model.named_parameters())
    trainable = [name for name, p in params.items() if p.grad is not None]
    out["grad_names"] = np.array(trainable)
    out["grad_norms"] = torch.stack([params[name].grad.norm() for name in trainable])
    for key in GRAD_KEYS:
        out[f"grad:{key}"] = params[key].grad
    return {k: v if isinstance(v, np.ndarray) else v.detach().double().numpy() for k, v in out.items()}


def build_released(official: Path, dinov2: Path, size: str = SIZE, mixed_precision: bool = False) -> nn.Module:
    """The released model (vits unless told; `make gpu-check RELEASED=...` builds the vitl with its autocast regions
    on) built offline: timm's EdgeNeXt without pretrained weights and DINOv2 from a local checkout instead of
    torch.hub's download."""
    import timm
    from omegaconf import OmegaConf

    create_model = timm.create_model
    timm.create_model = lambda *a, **k: create_model(*a, **{**k, "pretrained": False})
    hub_load = torch.hub.load

    def local_dinov2(repo, name, *args, **kwargs):
        if not repo.startswith("facebookresearch/dinov2"):
            raise RuntimeError(f"unexpected torch.hub.load({repo!r})")
        return hub_load(str(dinov2), name, *args, **{**kwargs, "source": "local", "pretrained": False})

    torch.hub.load = local_dinov2
    sys.path[:0] = [str(official), str(dinov2)]
    from core.foundation_stereo import FoundationStereo

    # The released cfg.yaml's model keys (by default with the small ViT and no CUDA autocast).
    args = OmegaConf.create({"vit_size": size, "hidden_dims": [128, 128, 128], "n_gru_layers": 3, "n_downsample": 2,
                             "max_disp": 416, "corr_radius": 4, "corr_levels": 2, "corr_implementation": "reg",
                             "mixed_precision": mixed_precision, "low_memory": 0, "train_iters": 22,
                             "valid_iters": 32})
    return FoundationStereo(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of NVlabs/FoundationStereo")
    parser.add_argument("--dinov2", type=Path, required=True, help="checkout of facebookresearch/dinov2")
    parser.add_argument("--out", type=Path, default=GOLDEN)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    model = build_released(args.official, args.dinov2).double()
    # The released forward casts to float32 in places (`.float()`); keep float64 throughout.
    as_float = torch.Tensor.float
    torch.Tensor.float = lambda t, *a, **k: t if t.dtype == torch.float64 else as_float(t, *a, **k)
    golden = run_cases(model, torch.float64, lambda left, right: model.run_hierachical(
        left, right, iters=ITERS, test_mode=True, small_ratio=0.5))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **{k: v.astype(np.float32) if v.dtype == np.float64 else v
                                     for k, v in golden.items()})
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in golden.items()))


if __name__ == "__main__":
    main()
