"""Context upsampling (IGEV style): each full-res pixel is a convex combination of its parent's 3x3 neighbourhood."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stereo.model.precision import autocast_off, upcast


def context_upsample(disp_low: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """disp_low (B,1,h,w) in 1/4-res px, logits (B,9,H,W) at full res -> disparity (B,1,H,W) in full-res px (x4).

    Runs in fp32: the softmax weights and the weighted sum decide sub-pixel accuracy.
    """
    b, _, h, w = disp_low.shape
    full_h, full_w = logits.shape[2:]
    with autocast_off(disp_low.device):
        weights = torch.softmax(upcast(logits), dim=1)
        patches = F.unfold(4.0 * upcast(disp_low), 3, padding=1).reshape(b, 9, h, w)
        patches = F.interpolate(patches, (full_h, full_w), mode="nearest")
        return (patches * weights).sum(1, keepdim=True)
