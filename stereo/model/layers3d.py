"""3-D building blocks of the cost-volume side (key names follow the released checkpoint)."""

from __future__ import annotations

import torch
from torch import nn

from stereo.model.layers import BasicConv


class BasicConv3d(nn.Module):
    """Conv3d (or ConvTranspose3d) without bias + optional BatchNorm3d + optional LeakyReLU(0.01).

    `bn` is registered before `conv` so that the state-dict order matches the released checkpoint.
    """

    def __init__(self, in_channels: int, out_channels: int, *, deconv: bool = False, bn: bool = True,
                 relu: bool = True, kernel_size=3, stride=1, padding=1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm3d(out_channels) if bn else nn.Identity()
        conv = nn.ConvTranspose3d if deconv else nn.Conv3d
        self.conv = conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.act = nn.LeakyReLU(0.01) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ResnetBasicBlock3D(nn.Module):
    """Two 3x3x3 no-bias convs with BatchNorm3d and an identity skip."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(x + y)


class AxialPlanarConv3d(nn.Module):
    """Axial-planar convolution: a (1,k,k) spatial conv then a (kd,1,1) disparity conv, each with BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, kernel_disp: int = 17) -> None:
        super().__init__()
        k, kd = kernel_size, kernel_disp
        self.conv1 = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, (1, k, k), padding=(0, k // 2, k // 2)),
            nn.BatchNorm3d(out_channels), nn.ReLU())
        self.conv2 = nn.Sequential(
            nn.Conv3d(out_channels, out_channels, (kd, 1, 1), padding=(kd // 2, 0, 0)),
            nn.BatchNorm3d(out_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class FeatureAtt(nn.Module):
    """Image features -> per-channel sigmoid gate, broadcast over the disparity axis of a cost volume."""

    def __init__(self, volume_channels: int, feature_channels: int) -> None:
        super().__init__()
        self.feat_att = nn.Sequential(
            BasicConv(feature_channels, feature_channels // 2, 1),
            nn.Conv2d(feature_channels // 2, volume_channels, 1))

    def forward(self, volume: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        return volume * torch.sigmoid(self.feat_att(feature)).unsqueeze(2)
