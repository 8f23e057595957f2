"""DepthAnything-V2's DPT head (keys `projects`, `resize_layers`, `scratch.*`), cut at `output_conv1`.

The stereo model uses only the `output_conv1` feature resized to the ViT input size; the depth branch
(`scratch.output_conv2`) keeps its weights for strict loading of the releases but is never run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stereo.model.backbone.dims import DPTDims
from stereo.model.backbone.dinov2 import DinoVisionTransformer


class ResidualConvUnit(nn.Module):
    """ReLU-conv3x3-ReLU-conv3x3 (with bias, no norm) plus the input."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """RefineNet fusion: (+ unit1(skip)), unit2, bilinear (align_corners=True) resize, 1x1 out_conv."""

    def __init__(self, features: int):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    def __init__(self, in_channels: int, dims: DPTDims):
        super().__init__()
        oc, f = dims.out_channels, dims.features
        self.projects = nn.ModuleList(nn.Conv2d(in_channels, c, 1) for c in oc)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], 4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], 2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], 3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for i, c in enumerate(oc, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(c, f, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FeatureFusionBlock(f))
        self.scratch.output_conv1 = nn.Conv2d(f, f // 2, 3, padding=1)
        # Depth branch: weights only (see the module docstring).
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(f // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1), nn.ReLU(), nn.Identity()
        )

    def forward(self, tokens: list[torch.Tensor], grid_h: int, grid_w: int, patch_size: int) -> torch.Tensor:
        """tokens: four (B, grid_h*grid_w, C) patch-token maps -> (B, features/2, grid_h*14, grid_w*14)."""
        levels = []
        for x, project, resize in zip(tokens, self.projects, self.resize_layers):
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], grid_h, grid_w)
            levels.append(resize(project(x)))
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i}_rn")(x) for i, x in enumerate(levels, start=1))
        path = s.refinenet4(l4, None, size=l3.shape[-2:])
        path = s.refinenet3(path, l3, size=l2.shape[-2:])
        path = s.refinenet2(path, l2, size=l1.shape[-2:])
        path = s.refinenet1(path, l1, size=(2 * l1.shape[-2], 2 * l1.shape[-1]))
        out = s.output_conv1(path)
        return F.interpolate(out, size=(grid_h * patch_size, grid_w * patch_size), mode="bilinear", align_corners=True)


class DepthAnything(nn.Module):
    """DepthAnything-V2 = DINOv2 (`pretrained`) + DPT head (`depth_head`), returning the output_conv1 feature."""

    def __init__(self, vit: DinoVisionTransformer, head: DPTHead):
        super().__init__()
        self.pretrained = vit
        self.depth_head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W), H and W multiples of 14 -> (B, features/2, H, W)."""
        p = self.pretrained.patch_size
        tokens = self.pretrained.get_intermediate_layers(x)
        return self.depth_head(tokens, x.shape[-2] // p, x.shape[-1] // p, p)
