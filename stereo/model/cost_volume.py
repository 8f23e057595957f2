"""Cost volumes at 1/4 resolution and the soft-argmin, vectorised over disparity (no loop over bins).

Bin d compares left column x with right column x - d; columns x < d have no partner and stay 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stereo.model.precision import autocast_off, upcast


def _shift_index(width: int, num_disp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-view column x - d for every (d, x), clamped into range, and the mask of columns with x >= d."""
    x = torch.arange(width, device=device)
    d = torch.arange(num_disp, device=device)
    src = x[None, :] - d[:, None]  # (D, W)
    return src.clamp(min=0), src >= 0


def gwc_volume(left: torch.Tensor, right: torch.Tensor, num_disp: int, groups: int) -> torch.Tensor:
    """Group-wise cosine correlation (B,C,H,W) x2 -> (B,groups,D,H,W), computed in fp32.

    One batched matmul per row gives every left/right column pair; the band x - d is then gathered.
    """
    b, c, h, w = left.shape
    if c % groups:
        raise ValueError(f"feature channels {c} are not divisible by {groups} correlation groups")
    with autocast_off(left.device):
        lf = F.normalize(upcast(left).reshape(b, groups, c // groups, h, w), dim=2)
        rf = F.normalize(upcast(right).reshape(b, groups, c // groups, h, w), dim=2)
        # (B,G,H,W,Cg) @ (B,G,H,Cg,W) -> (B,G,H,W_left,W_right)
        pairs = torch.matmul(lf.permute(0, 1, 3, 4, 2), rf.permute(0, 1, 3, 2, 4))
        src, valid = _shift_index(w, num_disp, left.device)
        index = src.t().expand(b, groups, h, w, num_disp)  # (.., x, d) -> right column x - d
        band = torch.gather(pairs, 4, index) * valid.t()
        return band.permute(0, 1, 4, 2, 3).contiguous()


def concat_volume(left: torch.Tensor, right: torch.Tensor, num_disp: int) -> torch.Tensor:
    """(B,C,H,W) x2 -> (B,2C,D,H,W): the left feature at every x for every d, then the right one shifted by d."""
    b, c, h, w = left.shape
    src, valid = _shift_index(w, num_disp, left.device)
    shifted = right[:, :, :, src] * valid.to(right.dtype)  # (B,C,H,D,W)
    return torch.cat([left.unsqueeze(2).expand(b, c, num_disp, h, w), shifted.permute(0, 1, 3, 2, 4)], 1)


def soft_argmin(logits: torch.Tensor) -> torch.Tensor:
    """(B,D,H,W) matching logits -> expected disparity (B,1,H,W) in bins, softmax and sum in fp32."""
    with autocast_off(logits.device):
        prob = torch.softmax(upcast(logits), dim=1)
        bins = torch.arange(logits.shape[1], device=logits.device, dtype=prob.dtype).view(1, -1, 1, 1)
        return (prob * bins).sum(1, keepdim=True)
