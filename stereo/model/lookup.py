"""Geometry lookup (fp32): taps of the filtered cost volume and of the all-pairs correlation around the disparity.

Sampling is exact 1-D linear interpolation with zero padding, the same numbers as `grid_sample(bilinear,
align_corners=True, zeros)` on a one-pixel-high grid, done with two gathers: the 2r+1 taps around a position p
share the fractional part of p, so the 2r+2 integer neighbours of floor(p) - r suffice. No host syncs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from stereo.model.precision import autocast_off, upcast


def sample_taps(values: torch.Tensor, position: torch.Tensor, radius: int) -> torch.Tensor:
    """values (N,C,L), position (N,) in index units -> (N,C,2r+1) at position + (-r..r), zero outside [0, L-1]."""
    n, c, length = values.shape
    base = torch.floor(position)
    frac = (position - base)[:, None, None]
    index = base.long()[:, None] + torch.arange(-radius, radius + 2, device=values.device)  # (N, 2r+2)
    inside = ((index >= 0) & (index < length)).to(values.dtype)[:, None, :]
    picked = torch.gather(values, 2, index.clamp(0, length - 1)[:, None, :].expand(n, c, -1)) * inside
    return picked[..., :-1] * (1 - frac) + picked[..., 1:] * frac


class LookupPyramid(NamedTuple):
    """The tensors a lookup reads: per level the volume (B*h*w, C, D/2^i) and the correlation (B*h*w, 1, w/2^i),
    and each row's column index. Plain tensors, so that a compiled GRU iteration takes them as graph inputs."""

    geo: tuple[torch.Tensor, ...]
    corr: tuple[torch.Tensor, ...]
    column: torch.Tensor


def build_pyramid(volume: torch.Tensor, left: torch.Tensor, right: torch.Tensor, levels: int) -> LookupPyramid:
    """From the filtered volume (B,C,D,h,w) and the 1/4 features (B,F,h,w) of both views; built once per forward."""
    b, c, d, h, w = volume.shape
    with autocast_off(volume.device):
        geo = upcast(volume).permute(0, 3, 4, 1, 2).reshape(b * h * w, c, d)
        lf = F.normalize(upcast(left), dim=1)
        rf = F.normalize(upcast(right), dim=1)
        corr = torch.einsum("bchx,bchy->bhxy", lf, rf).reshape(b * h * w, 1, w)
        geo_levels, corr_levels = [geo], [corr]
        for _ in range(levels - 1):
            geo_levels.append(F.avg_pool1d(geo_levels[-1], 2, stride=2))
            corr_levels.append(F.avg_pool1d(corr_levels[-1], 2, stride=2))
        column = torch.arange(w, device=volume.device, dtype=torch.float32).repeat(b * h)
    return LookupPyramid(tuple(geo_levels), tuple(corr_levels), column)


def lookup(pyramid: LookupPyramid, disp: torch.Tensor, radius: int) -> torch.Tensor:
    """disp (B,1,h,w) in 1/4-res px -> (B, levels*(2r+1)*(C+1), h, w): per level the volume taps (index
    c*(2r+1) + tap) then the correlation taps; level i works at 1/2^i along its sampled axis."""
    b, _, h, w = disp.shape
    d = upcast(disp).reshape(-1)
    out = []
    with autocast_off(disp.device):
        for i, (geo, corr) in enumerate(zip(pyramid.geo, pyramid.corr)):
            scale = 2.0 ** i
            out.append(sample_taps(geo, d / scale, radius).flatten(1))
            out.append(sample_taps(corr, pyramid.column / scale - d / scale, radius).flatten(1))
    return torch.cat(out, 1).reshape(b, h, w, -1).permute(0, 3, 1, 2)
