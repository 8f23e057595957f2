"""2-D building blocks shared by the feature network, the context network and the upsampler.

Attribute names follow the released FoundationStereo code so that its checkpoints load strictly:
`BasicConv` -> `.conv`/`.bn`, `Conv2x`/`Conv2xIN` -> `.conv1`/`.conv2`, RAFT's `ResidualBlock` ->
`conv1`/`conv2`/`norm1`/`norm2`/`norm3`/`downsample.{0,1}`, `ResnetBasicBlock` -> `conv1`/`bn1`/`conv2`/`bn2`.
InstanceNorm is always without affine parameters and running stats (no state-dict keys), as released.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["batch", "instance", "none"]


def norm_2d(kind: Norm, channels: int) -> nn.Module:
    """BatchNorm2d, InstanceNorm2d (no affine, no running stats: no keys) or Identity."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'instance' or 'none', got {kind!r}")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor (timm/ConvNeXt layout: keys weight, bias)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC view: contiguous for channels-last inputs, one fused layer_norm either way.
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class BasicConv(nn.Module):
    """Conv (or transposed conv) without bias, then an optional norm, then LeakyReLU(0.01).

    `norm="none"` creates no `.bn` module (as the released `bn=False`), so the key set matches.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        deconv: bool = False,
        norm: Norm = "batch",
        relu: bool = True,
    ):
        super().__init__()
        conv_type = nn.ConvTranspose2d if deconv else nn.Conv2d
        # `bn` registered before `conv`, as in the release, so the state dict's key order equals the manifest's
        self.bn = norm_2d(norm, out_channels) if norm != "none" else None
        self.conv = conv_type(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu:
            x = F.leaky_relu(x, 0.01)
        return x


class ResnetBasicBlock(nn.Module):
    """torchvision-style basic block with identity skip: conv3x3-norm-ReLU-conv3x3-norm, + x, ReLU.

    Convs have no bias; with InstanceNorm (the feature decoder's choice) the block has only conv keys.
    """

    def __init__(self, channels: int, norm: Norm = "instance"):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = norm_2d(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm_2d(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class ResidualBlock(nn.Module):
    """RAFT's residual block: conv3x3(bias)-norm-ReLU twice; 1x1 conv + norm on the skip when the shape changes."""

    def __init__(self, in_planes: int, planes: int, norm: Norm = "batch", stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1)
        self.norm1 = norm_2d(norm, planes)
        self.norm2 = norm_2d(norm, planes)
        self.stride = stride
        if stride == 1 and in_planes == planes:
            self.downsample = None
        else:
            self.norm3 = norm_2d(norm, planes)
            # The skip's 1x1 conv of stride s reads every s-th pixel: forward slices them and the conv runs at
            # stride 1, the same values and state dict. Inductor's CPU backward of a strided 1x1 conv (torch 2.13)
            # corrupts the heap (docs/performance.md).
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1), self.norm3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        if self.downsample is not None:
            x = self.downsample(x[:, :, ::self.stride, ::self.stride])
        return F.relu(x + y)


def _match_size(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    # Shapes are static per input size, so this branch is resolved once at trace time.
    if x.shape[-2:] != ref.shape[-2:]:
        x = F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)
    return x


class Conv2x(nn.Module):
    """Up-block: transposed conv 4x4 s2 (+norm) + LeakyReLU, concat the skip, BasicConv 3x3 on 2*out channels.

    The released `Conv2x(..., deconv=True, concat=True, keep_concat=True)`; used by the disparity upsampler.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: Norm = "batch"):
        super().__init__()
        self.conv1 = BasicConv(in_channels, out_channels, 4, stride=2, padding=1, deconv=True, norm=norm)
        self.conv2 = BasicConv(out_channels * 2, out_channels * 2, 3, padding=1, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = _match_size(self.conv1(x), skip)
        return self.conv2(torch.cat((x, skip), dim=1))


class Conv2xIN(nn.Module):
    """The released `Conv2x_IN(deconv=True, concat=True)`: transposed conv 4x4 s2 + IN + LeakyReLU, concat the
    skip, then a `ResnetBasicBlock` with InstanceNorm on 2*out channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = BasicConv(in_channels, out_channels, 4, stride=2, padding=1, deconv=True, norm="instance")
        self.conv2 = ResnetBasicBlock(out_channels * 2, norm="instance")

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = _match_size(self.conv1(x), skip)
        return self.conv2(torch.cat((x, skip), dim=1))


class Mlp(nn.Module):
    """Transformer MLP (fc1, GELU, fc2), shared by the DINOv2 blocks and the EdgeNeXt blocks (same keys)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
