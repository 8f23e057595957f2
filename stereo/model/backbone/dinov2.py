"""DINOv2 ViT/14 (torch.hub `dinov2_vit{s,b,l}14` layout), only what DepthAnything-V2 uses.

Keys: cls_token, pos_embed (1, 1+37*37, C), mask_token (kept for strict loading; masking is not used),
patch_embed.proj, blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}, norm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stereo.model.backbone.dims import ViTDims
from stereo.model.layers import Mlp
from stereo.model.precision import upcast

# DINOv2's interpolation kludge: scale factors (n + 0.1) / M instead of sizes, bicubic, no antialias.
POS_INTERPOLATE_OFFSET = 0.1


CUBIC_A = -0.75  # torch's (and OpenCV's) bicubic kernel


def bicubic_matrix(size: int, in_size: int, like: torch.Tensor, offset: float | None = None) -> torch.Tensor:
    """(size, in_size) weights of torch's bicubic interpolation (align_corners=False) along one axis: half-pixel
    source positions, four taps clamped at the borders. The source step is in_size / size, or with `offset` the
    inverse of DINOv2's scale factor (size + offset) / in_size. The same numbers as `F.interpolate`, built from tensors
    so that an ONNX export keeps the sizes symbolic (F.interpolate's bicubic sizes and scale factors export as
    constants, or as a Resize that onnxruntime rejects)."""
    out = torch.arange(size, device=like.device, dtype=like.dtype)  # fp32 in an export: TensorRT has no fp64
    columns = torch.arange(in_size, device=like.device)
    count = torch.ones_like(out).sum()  # the sizes as 0-d tensors (sums of ones export to every runtime)
    source = torch.ones(in_size, device=like.device, dtype=like.dtype).sum()
    real = (out + 0.5) * (source / (count + offset if offset is not None else count)) - 0.5
    first = torch.floor(real)
    t = real - first

    def near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
        return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
        return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A

    taps = ((far(t + 1), -1), (near(t), 0), (near(1 - t), 1), (far(2 - t), 2))
    return sum(weight[:, None] * (columns == (first.long() + k).clamp(0, in_size - 1)[:, None]).to(like.dtype)
               for weight, k in taps)


def bicubic_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`F.interpolate(x, size, mode="bicubic", align_corners=False)` of (N,C,H,W) as two matrix products."""
    rows = bicubic_matrix(size[0], x.shape[-2], x)
    cols = bicubic_matrix(size[1], x.shape[-1], x)
    return torch.matmul(torch.matmul(rows, x), cols.t())


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class DinoVisionTransformer(nn.Module):
    def __init__(self, dims: ViTDims):
        super().__init__()
        c = dims.embed_dim
        self.patch_size = dims.patch_size
        self.take_layers = dims.take_layers
        grid = dims.img_size // dims.patch_size
        self.patch_embed = PatchEmbed(dims.patch_size, c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, c))
        self.mask_token = nn.Parameter(torch.zeros(1, c))
        self.blocks = nn.ModuleList(Block(c, dims.num_heads, dims.mlp_ratio) for _ in range(dims.depth))
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.checkpoint = False  # recompute each block in backward (set by Feature when the ViT is trained)
        self._init_weights()

    def _init_weights(self) -> None:
        # DINOv2's init (random start; real runs load the DepthAnything-V2 release).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> torch.Tensor:
        """pos_embed for a grid_h x grid_w patch grid (DINOv2's bicubic resampling of the 37x37 table, done in
        fp32 and cast to the tokens' dtype; the native grid returns the table as stored, as DINOv2 does)."""
        pos = self.pos_embed
        n = pos.shape[1] - 1
        m = int(math.sqrt(n))
        if grid_h == m and grid_w == m:
            return pos
        pos = upcast(pos)
        table = pos[:, 1:].reshape(1, m, m, -1)
        rows = bicubic_matrix(grid_h, m, pos, POS_INTERPOLATE_OFFSET)
        cols = bicubic_matrix(grid_w, m, pos, POS_INTERPOLATE_OFFSET)
        table = torch.einsum("ia,nabc,jb->nijc", rows, table, cols).reshape(1, grid_h * grid_w, -1)
        return torch.cat((pos[:, :1], table), dim=1).to(dtype)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"ViT input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return tokens + self.interpolate_pos_encoding(h // self.patch_size, w // self.patch_size, tokens.dtype)

    def get_intermediate_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens (B, N, C) after each block in `take_layers`, each passed through the final norm
        (DINOv2's `get_intermediate_layers(x, idx, norm=True)`; the class token is dropped, DPT ignores it)."""
        x = self.prepare_tokens(x)
        taken = []
        for i, block in enumerate(self.blocks[: max(self.take_layers) + 1]):
            if self.checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in self.take_layers:
                taken.append(self.norm(x)[:, 1:])
        return taken
