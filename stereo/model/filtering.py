"""Attentive hybrid cost filtering: the 3-D hourglass with axial-planar convs and the disparity transformer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stereo.model.layers3d import AxialPlanarConv3d, BasicConv3d, FeatureAtt


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Fixed position table (length, dim): sin on even channels, cos on odd ones, base 10000."""
    # Explicitly on the CPU so that a model built on the meta device still gets real values.
    position = torch.arange(length, dtype=torch.float32, device="cpu")[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device="cpu")
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


class MultiheadSelfAttention(nn.Module):
    """Self-attention with separate q/k/v/out projections; each head attends over the sequence axis."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            # (N, L, heads, d) -> (N, heads, L, d): heads before the sequence axis, as flash-attn's layout means
            return t.view(n, length, self.heads, dim // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(n, length, dim))


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer (attention, GELU FFN), dropout after attention, in and after the FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = MultiheadSelfAttention(dim, heads)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x)))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.gelu(self.linear1(x))))))


class DisparityAttention(nn.Module):
    """Transformer over the disparity tokens of every (b, y, x) location of a (B,C,D,H,W) volume."""

    def __init__(self, dim: int, heads: int, layers: int, max_len: int) -> None:
        super().__init__()
        self.sa = nn.ModuleList(EncoderLayer(dim, heads, dim) for _ in range(layers))
        # A plain attribute, not a buffer: the released state dict has no position table.
        self.pos_table = sinusoidal_table(max_len, dim)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = volume.shape
        if d > self.pos_table.shape[0]:
            raise ValueError(f"{d} disparity tokens exceed the position table ({self.pos_table.shape[0]}); "
                             "raise model.max_disp")
        x = volume.permute(0, 3, 4, 2, 1).reshape(b * h * w, d, c)
        x = x + self.pos_table[:d].to(device=x.device, dtype=x.dtype)
        for layer in self.sa:
            x = layer(x)
        return x.reshape(b, h, w, d, c).permute(0, 4, 3, 1, 2)


class Hourglass(nn.Module):
    """`cost_agg`: 3-level 3-D hourglass gated by image features, plus the disparity transformer in parallel."""

    def __init__(self, channels: int, feature_dims: list[int], max_disp: int, kernel_disp: int,
                 heads: int, layers: int) -> None:
        super().__init__()
        c, kd = channels, kernel_disp

        def down(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(BasicConv3d(cin, cout, kernel_size=3, stride=2, padding=1),
                                 AxialPlanarConv3d(cout, cout, kernel_disp=kd))

        def up(cin: int, cout: int) -> BasicConv3d:
            return BasicConv3d(cin, cout, deconv=True, kernel_size=4, stride=2, padding=1)

        def agg(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(BasicConv3d(cin, cout, kernel_size=1, padding=0),
                                 AxialPlanarConv3d(cout, cout, kernel_disp=kd),
                                 AxialPlanarConv3d(cout, cout, kernel_disp=kd))

        self.conv1 = down(c, 2 * c)
        self.conv2 = down(2 * c, 4 * c)
        self.conv3 = down(4 * c, 6 * c)
        self.conv3_up = up(6 * c, 4 * c)
        self.conv2_up = up(4 * c, 2 * c)
        self.conv1_up = up(2 * c, c)
        self.conv_out = nn.Sequential(AxialPlanarConv3d(c, c, kernel_disp=kd), AxialPlanarConv3d(c, c, kernel_disp=kd))
        self.agg_0 = agg(8 * c, 4 * c)
        self.agg_1 = agg(4 * c, 2 * c)
        self.atts = nn.ModuleDict({"4": DisparityAttention(c, heads, layers, max_len=max_disp // 16)})
        self.conv_patch = nn.Sequential(nn.Conv3d(c, c, 4, stride=4, groups=c), nn.BatchNorm3d(c))
        self.feature_att_8 = FeatureAtt(2 * c, feature_dims[1])
        self.feature_att_16 = FeatureAtt(4 * c, feature_dims[2])
        self.feature_att_32 = FeatureAtt(6 * c, feature_dims[3])
        self.feature_att_up_16 = FeatureAtt(4 * c, feature_dims[2])
        self.feature_att_up_8 = FeatureAtt(2 * c, feature_dims[1])

    def forward(self, volume: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        conv1 = self.feature_att_8(self.conv1(volume), features[1])
        conv2 = self.feature_att_16(self.conv2(conv1), features[2])
        conv3 = self.feature_att_32(self.conv3(conv2), features[3])
        conv2 = self.agg_0(torch.cat([self.conv3_up(conv3), conv2], 1))
        conv2 = self.feature_att_up_16(conv2, features[2])
        conv1 = self.agg_1(torch.cat([self.conv2_up(conv2), conv1], 1))
        conv1 = self.feature_att_up_8(conv1, features[1])
        tokens = self.atts["4"](self.conv_patch(volume))
        out = self.conv1_up(conv1) + F.interpolate(tokens, scale_factor=4, mode="trilinear", align_corners=False)
        return self.conv_out(out)
