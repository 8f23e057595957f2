"""Context side: the BatchNorm context network (`cnet`) and the channel/spatial attention shared by the GRUs."""

from __future__ import annotations

import torch
from torch import nn

from stereo.model.layers import BasicConv, ResidualBlock


class ContextNet(nn.Module):
    """RAFT-Stereo multi-level context encoder with BatchNorm, fed the DepthAnything feature at 1/4.

    Returns, for 1/4, 1/8 and 1/16, the pair (hidden-state init, context). `down` and `norm` exist only so the
    released checkpoint loads strictly; they are never used.
    """

    def __init__(self, widths: tuple[int, int, int], vit_dim: int, out_dim: int) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.norm1 = nn.BatchNorm2d(w1)
        self.conv1 = nn.Conv2d(3, w1, 7, stride=1, padding=3)
        self.relu1 = nn.ReLU()
        self.layer1 = self._stage(w1, w1, 1)
        self.layer2 = self._stage(w1, w2, 2)
        self.layer3 = self._stage(w2, w3, 2)
        self.layer4 = self._stage(w3, w3, 2)
        self.layer5 = self._stage(w3, w3, 2)
        self.down = nn.Sequential(nn.Conv2d(w3, w3, 4, stride=4), nn.BatchNorm2d(w3))
        self.conv2 = BasicConv(w3 + vit_dim, w3, 3, padding=1)
        self.norm = nn.BatchNorm2d(2 * w3)
        self.outputs04 = nn.ModuleList(self._head(w3, out_dim) for _ in range(2))
        self.outputs08 = nn.ModuleList(self._head(w3, out_dim) for _ in range(2))
        self.outputs16 = nn.ModuleList(nn.Conv2d(w3, out_dim, 3, padding=1) for _ in range(2))

    @staticmethod
    def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(ResidualBlock(cin, cout, norm="batch", stride=stride),
                             ResidualBlock(cout, cout, norm="batch", stride=1))

    @staticmethod
    def _head(width: int, out_dim: int) -> nn.Sequential:
        return nn.Sequential(ResidualBlock(width, width, norm="batch", stride=1),
                             nn.Conv2d(width, out_dim, 3, padding=1))

    def forward(self, image: torch.Tensor, vit_feat: torch.Tensor) -> list[list[torch.Tensor]]:
        x = self.relu1(self.norm1(self.conv1(image)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.conv2(torch.cat([x, vit_feat], 1))
        y = self.layer4(x)
        z = self.layer5(y)
        return [[f(x) for f in self.outputs04], [f(y) for f in self.outputs08], [f(z) for f in self.outputs16]]


class ChannelAttention(nn.Module):
    """`cam`: sigmoid(MLP(avg-pool) + MLP(max-pool)) per channel."""

    def __init__(self, channels: int, ratio: int = 16) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Conv2d(channels, channels // ratio, 1, bias=False), nn.ReLU(),
                                nn.Conv2d(channels // ratio, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc(x.mean((2, 3), keepdim=True))
        peak = self.fc(x.amax((2, 3), keepdim=True))
        return torch.sigmoid(avg + peak)


class SpatialAttention(nn.Module):
    """`sam`: sigmoid(conv7x7([channel mean, channel max])) per pixel; weighs the small vs the large GRU."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.samconv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.samconv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))
