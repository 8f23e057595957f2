"""Iterative refinement: motion encoder, three Selective ConvGRUs (1/16, 1/8, 1/4), disparity and mask heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pool2x(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=2, padding=1)


def resize_like(x: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, dest.shape[2:], mode="bilinear", align_corners=True)


class MotionEncoder(nn.Module):
    """Geometry features (lookup) + current disparity -> motion features (out_dim - 1 channels, then the disparity)."""

    def __init__(self, lookup_dim: int, corr_dim: int, disp_dim: int, out_dim: int) -> None:
        super().__init__()
        self.convc1 = nn.Conv2d(lookup_dim, corr_dim, 1)
        self.convc2 = nn.Conv2d(corr_dim, corr_dim, 3, padding=1)
        self.convd1 = nn.Conv2d(1, disp_dim, 7, padding=3)
        self.convd2 = nn.Conv2d(disp_dim, disp_dim, 3, padding=1)
        self.conv = nn.Conv2d(corr_dim + disp_dim, out_dim - 1, 3, padding=1)

    def forward(self, disp: torch.Tensor, geo: torch.Tensor) -> torch.Tensor:
        cor = F.relu(self.convc2(F.relu(self.convc1(geo))))
        dsp = F.relu(self.convd2(F.relu(self.convd1(disp))))
        return torch.cat([F.relu(self.conv(torch.cat([cor, dsp], 1))), disp.to(cor.dtype)], 1)


class ConvGRU(nn.Module):
    """RAFT GRU cell on precomputed hx = conv(cat(x, h)); `kernel` sets the receptive field."""

    def __init__(self, hidden: int, input_dim: int, kernel: int) -> None:
        super().__init__()
        both = hidden + input_dim
        self.convz = nn.Conv2d(both, hidden, kernel, padding=kernel // 2)
        self.convr = nn.Conv2d(both, hidden, kernel, padding=kernel // 2)
        self.convq = nn.Conv2d(both, hidden, kernel, padding=kernel // 2)

    def forward(self, h: torch.Tensor, x: torch.Tensor, hx: torch.Tensor) -> torch.Tensor:
        z = torch.sigmoid(self.convz(hx))
        r = torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], 1)))
        return (1 - z) * h + z * q


class SelectiveConvGRU(nn.Module):
    """Selective-IGEV GRU: a 1x1 and a 3x3 GRU blended per pixel by the spatial attention map."""

    def __init__(self, hidden: int, input_dim: int, mix_kernel: int = 3) -> None:
        super().__init__()
        both = hidden + input_dim
        k = mix_kernel
        self.conv0 = nn.Sequential(nn.Conv2d(input_dim, input_dim, k, padding=k // 2), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(both, both, k, padding=k // 2), nn.ReLU())
        self.small_gru = ConvGRU(hidden, input_dim, 1)
        self.large_gru = ConvGRU(hidden, input_dim, 3)

    def forward(self, att: torch.Tensor, h: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        x = self.conv0(torch.cat(inputs, 1))
        hx = self.conv1(torch.cat([x, h], 1))
        return self.small_gru(h, x, hx) * att + self.large_gru(h, x, hx) * (1 - att)


class ConvNeXtBlock(nn.Module):
    """EdgeNeXt-style block without norm: depthwise 7x7, pointwise MLP (x4, GELU), layer scale, residual."""

    def __init__(self, dim: int, expansion: int = 4, kernel_size: int = 7) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.pwconv1 = nn.Linear(dim, expansion * dim)
        self.pwconv2 = nn.Linear(expansion * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class DispHead(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), ConvNeXtBlock(dim), ConvNeXtBlock(dim),
                                  nn.Conv2d(dim, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpdateBlock(nn.Module):
    """`update_block`: one refinement iteration over the three hidden states (1/4, 1/8, 1/16)."""

    def __init__(self, hidden: int, lookup_dim: int, corr_dim: int, disp_dim: int, mask_dims: tuple[int, int],
                 mix_kernel: int = 3) -> None:
        super().__init__()
        self.encoder = MotionEncoder(lookup_dim, corr_dim, disp_dim, hidden)
        self.gru16 = SelectiveConvGRU(hidden, 2 * hidden, mix_kernel)
        self.gru08 = SelectiveConvGRU(hidden, 3 * hidden, mix_kernel)
        self.gru04 = SelectiveConvGRU(hidden, 3 * hidden, mix_kernel)
        self.disp_head = DispHead(hidden)
        self.mask = nn.Sequential(nn.Conv2d(hidden, mask_dims[0], 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(mask_dims[0], mask_dims[1], 3, padding=1), nn.ReLU())

    def forward(self, net: list[torch.Tensor], inp: list[torch.Tensor], att: list[torch.Tensor],
                geo: torch.Tensor, disp: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Returns (new hidden states, mask features x0.25, disparity update)."""
        net16 = self.gru16(att[2], net[2], inp[2], pool2x(net[1]))
        net08 = self.gru08(att[1], net[1], inp[1], pool2x(net[0]), resize_like(net16, net[1]))
        motion = self.encoder(disp, geo)
        net04 = self.gru04(att[0], net[0], torch.cat([inp[0], motion], 1), resize_like(net08, net[0]))
        return [net04, net08, net16], 0.25 * self.mask(net04), self.disp_head(net04)
