"""The feature side of FoundationStereo (`model.feature`): frozen DepthAnything-V2 + trainable EdgeNeXt + fusion.

Left and right images are stacked on the batch (2B) and processed together. Released layout:
`dino.depth_anything.{pretrained,depth_head}`, `stem`, `stages`, `deconv32_16`, `deconv16_8`, `deconv8_4`, `conv4`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stereo.model.backbone.dims import BackboneDims
from stereo.model.backbone.dpt import DepthAnything, DPTHead
from stereo.model.backbone.dinov2 import DinoVisionTransformer, bicubic_resize
from stereo.model.backbone.edgenext import edgenext_stages, edgenext_stem, init_edgenext_
from stereo.model.layers import BasicConv, Conv2xIN, ResidualBlock

VIT_SIDE_MULTIPLE = 112  # lcm(patch 14, 16)
VIT_MAX_SIDE = 1344


def vit_input_size(h: int, w: int) -> tuple[int, int]:
    """Sides rounded up to multiples of 112; if one exceeds 1344, the longer becomes 1344 and the other keeps the
    aspect ratio (rounded up), as the released `get_resize_keep_aspect_ratio`."""

    def up(x: float) -> int:
        if isinstance(x, float):
            return int(math.ceil(x / VIT_SIDE_MULTIPLE) * VIT_SIDE_MULTIPLE)
        # integers: exact, and symbolic in an ONNX export (no negative floor division: ONNX's Div truncates)
        return (x + VIT_SIDE_MULTIPLE - 1) // VIT_SIDE_MULTIPLE * VIT_SIDE_MULTIPLE

    rh, rw = up(h), up(w)
    if rh > VIT_MAX_SIDE or rw > VIT_MAX_SIDE:
        if rh > rw:
            rh, rw = VIT_MAX_SIDE, up(rw * VIT_MAX_SIDE / rh)
        else:
            rh, rw = up(rh * VIT_MAX_SIDE / rw), VIT_MAX_SIDE
    return rh, rw


class DepthAnythingFeature(nn.Module):
    """Resizes the normalised image for the ViT and returns DepthAnything's output_conv1 feature at that size."""

    def __init__(self, dims: BackboneDims):
        super().__init__()
        self.depth_anything = DepthAnything(DinoVisionTransformer(dims.vit), DPTHead(dims.vit.embed_dim, dims.dpt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = vit_input_size(*x.shape[-2:])
        return self.depth_anything(bicubic_resize(x, size))


class Feature(nn.Module):
    """Feature pyramid for the cost volume and the context network.

    forward(x): x (2B, 3, H, W) ImageNet-normalised, H and W multiples of 32. Returns
    `([x4 (2B, d_out[0], H/4, W/4), x8 (d_out[1], H/8), x16 (d_out[2], H/16), x32 (d_out[3], H/32)], vit_feat)`
    with vit_feat (2B, vit_feat_dim, H/4, W/4).

    freeze_vit: DepthAnything gets no gradients, stays in eval mode and runs under no_grad (the paper's setting);
    False trains it too (full fine-tuning; it then follows train/eval).
    checkpoint: recompute the trainable parts (EdgeNeXt, decoder, and the ViT blocks when trained) in backward.
    """

    def __init__(self, dims: BackboneDims, freeze_vit: bool = True, checkpoint: bool = False):
        super().__init__()
        c = dims.edgenext.dims
        self.stem = edgenext_stem(dims.edgenext)
        self.stages = edgenext_stages(dims.edgenext)
        init_edgenext_(self.stem)
        init_edgenext_(self.stages)
        self.dino = DepthAnythingFeature(dims)
        self.deconv32_16 = Conv2xIN(c[3], c[2])
        self.deconv16_8 = Conv2xIN(2 * c[2], c[1])
        self.deconv8_4 = Conv2xIN(2 * c[1], c[0])
        d4 = 2 * c[0] + dims.vit_feat_dim
        self.conv4 = nn.Sequential(
            BasicConv(d4, d4, 3, padding=1, norm="instance"),
            ResidualBlock(d4, d4, norm="instance"),
            ResidualBlock(d4, d4, norm="instance"),
        )
        self.d_out: list[int] = dims.d_out
        self.vit_feat_dim: int = dims.vit_feat_dim
        self.freeze_vit = freeze_vit
        self.checkpoint = checkpoint
        # Where the DepthAnything weights came from (set by the loaders); None = random init, which a frozen ViT
        # would keep forever. A plain attribute: not in the state dict.
        self.vit_initialised_from: str | None = None
        if freeze_vit:
            self.dino.requires_grad_(False)
            self.dino.eval()
        self.dino.depth_anything.pretrained.checkpoint = checkpoint and not freeze_vit

    def train(self, mode: bool = True) -> "Feature":
        super().train(mode)
        if self.freeze_vit:
            self.dino.eval()
        return self

    def _run(self, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"Feature input must have H and W divisible by 32, got {h}x{w}")
        if self.freeze_vit:
            with torch.no_grad():
                vit_feat = self.dino(x)
        else:
            vit_feat = self.dino(x)
        vit_feat = F.interpolate(vit_feat, size=(h // 4, w // 4), mode="bilinear", align_corners=True)

        x4 = self._run(lambda t: self.stages[0](self.stem(t)), x)
        x8 = self._run(self.stages[1], x4)
        x16 = self._run(self.stages[2], x8)
        x32 = self._run(self.stages[3], x16)
        x16 = self._run(self.deconv32_16, x32, x16)
        x8 = self._run(self.deconv16_8, x16, x8)
        x4 = self._run(self.deconv8_4, x8, x4)
        x4 = self._run(self.conv4, torch.cat((x4, vit_feat), dim=1))
        return [x4, x8, x16, x32], vit_feat
