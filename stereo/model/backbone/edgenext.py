"""EdgeNeXt (Maaz et al. 2022) in timm's module layout, stem and stages only (no classifier head).

Keys as timm's `edgenext_small`: `stem.{0,1}`, `stages.{i}.downsample.{0,1}` (stages 1..3),
`stages.{i}.blocks.{j}` = ConvBlock (`conv_dw`, `norm`, `mlp.fc1/fc2`, `gamma`) or, for the last block(s),
SplitTransposeBlock (`convs.*`, `pos_embd.token_projection`, `norm_xca`, `gamma_xca`, `xca.{temperature,qkv,proj}`,
`norm`, `mlp.*`, `gamma`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stereo.model.backbone.dims import EdgeNeXtDims
from stereo.model.layers import LayerNorm2d, Mlp

LAYER_SCALE_INIT = 1e-6


class ConvBlock(nn.Module):
    """Depthwise kxk conv, then a channels-last LayerNorm + MLP scaled by `gamma`, plus the input."""

    def __init__(self, dim: int, kernel_size: int, expand_ratio: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, expand_ratio * dim)
        self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.mlp(self.norm(y))
        return x + y.permute(0, 3, 1, 2)


class PositionalEncodingFourier(nn.Module):
    """Fixed 2-D sine/cosine encoding of normalised (y, x) positions, projected by a learned 1x1 conv."""

    def __init__(self, dim: int, hidden_dim: int = 32, temperature: float = 10000.0):
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, 1)
        self.hidden_dim = hidden_dim
        self.temperature = temperature

    def forward(self, batch: int, h: int, w: int) -> torch.Tensor:
        device = self.token_projection.weight.device
        eps, scale = 1e-6, 2 * math.pi
        ys = torch.arange(1, h + 1, device=device, dtype=torch.float32)
        xs = torch.arange(1, w + 1, device=device, dtype=torch.float32)
        y_embed = (ys / (h + eps) * scale)[:, None].expand(h, w)
        x_embed = (xs / (w + eps) * scale)[None, :].expand(h, w)
        i = torch.arange(self.hidden_dim, device=device, dtype=torch.float32)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.hidden_dim)

        def encode(e: torch.Tensor) -> torch.Tensor:
            p = e[:, :, None] / dim_t  # (h, w, hidden): interleave sin of even and cos of odd frequencies
            return torch.stack((p[:, :, 0::2].sin(), p[:, :, 1::2].cos()), dim=3).flatten(2)

        pos = torch.cat((encode(y_embed), encode(x_embed)), dim=2).permute(2, 0, 1)[None]
        pos = self.token_projection(pos.to(self.token_projection.weight.dtype))
        return pos.expand(batch, -1, -1, -1)


class CrossCovarianceAttn(nn.Module):
    """XCA: attention between channels (C/heads x C/heads per head) on L2-normalised q, k, scaled by a learned
    per-head temperature."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 4, 1).unbind(0)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        x = attn.softmax(dim=-1) @ v  # (B, heads, C/heads, N)
        return self.proj(x.permute(0, 3, 1, 2).reshape(b, n, c))


class SplitTransposeBlock(nn.Module):
    """SDTA: Res2Net-style chained depthwise 3x3 convs over channel chunks, optional positional encoding,
    XCA (scaled by `gamma_xca`), then LayerNorm + MLP (scaled by `gamma`), plus the input."""

    def __init__(self, dim: int, num_scales: int, num_heads: int, expand_ratio: int, use_pos_emb: bool):
        super().__init__()
        width = math.ceil(dim / num_scales)  # torch.chunk's chunk size
        self.num_chunks = max(1, num_scales - 1) + 1
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, 3, padding=1, groups=width) for _ in range(self.num_chunks - 1)
        )
        self.pos_embd = PositionalEncodingFourier(dim) if use_pos_emb else None
        self.norm_xca = nn.LayerNorm(dim, eps=1e-6)
        self.gamma_xca = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.xca = CrossCovarianceAttn(dim, num_heads)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, expand_ratio * dim)
        self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        chunks = x.chunk(self.num_chunks, dim=1)
        outs, sp = [], chunks[0]
        for i, conv in enumerate(self.convs):
            sp = conv(sp if i == 0 else sp + chunks[i])
            outs.append(sp)
        x = torch.cat([*outs, chunks[-1]], dim=1)

        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.pos_embd is not None:
            x = x + self.pos_embd(b, h, w).flatten(2).transpose(1, 2)
        x = x + self.gamma_xca * self.xca(self.norm_xca(x))
        x = self.gamma * self.mlp(self.norm(x.reshape(b, h, w, c)))
        return shortcut + x.permute(0, 3, 1, 2)


class EdgeNeXtStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, index: int, d: EdgeNeXtDims):
        super().__init__()
        # Stage 0 follows the stride-4 stem directly; the others halve the resolution first.
        self.downsample = (
            nn.Identity() if index == 0 else nn.Sequential(LayerNorm2d(in_dim), nn.Conv2d(in_dim, dim, 2, stride=2))
        )
        n_local = d.depths[index] - d.global_blocks[index]
        blocks: list[nn.Module] = [ConvBlock(dim, d.kernel_sizes[index], d.expand_ratio) for _ in range(n_local)]
        blocks += [
            SplitTransposeBlock(dim, d.d2_scales[index], d.heads[index], d.expand_ratio, d.use_pos_emb[index])
            for _ in range(d.global_blocks[index])
        ]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def edgenext_stem(d: EdgeNeXtDims) -> nn.Sequential:
    """Patchify stem: 4x4 stride-4 conv + LayerNorm2d (keys stem.0, stem.1)."""
    return nn.Sequential(nn.Conv2d(3, d.dims[0], 4, stride=4), LayerNorm2d(d.dims[0]))


def edgenext_stages(d: EdgeNeXtDims) -> nn.Sequential:
    in_dims = (d.dims[0], *d.dims[:3])
    return nn.Sequential(*(EdgeNeXtStage(in_dims[i], d.dims[i], i, d) for i in range(4)))


def init_edgenext_(module: nn.Module) -> None:
    """timm's init for a random start: truncated normal (std 0.02) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
