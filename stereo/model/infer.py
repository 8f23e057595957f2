"""Inference on any image size: replicate-pad to a multiple of 32, run in test mode, crop back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DIVISOR = 32  # the 1/4-res volume is halved three more times in the hourglass


class InputPadder:
    """Replicate padding split evenly (left = pad // 2, right = the rest; same for top/bottom)."""

    def __init__(self, height: int, width: int, divisor: int = DIVISOR) -> None:
        pad_h, pad_w = -height % divisor, -width % divisor
        self.pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)  # F.pad order: l, r, t, b

    def pad_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad, mode="replicate") if any(self.pad) else x

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = self.pad
        return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]


def predict(model: nn.Module, left: torch.Tensor, right: torch.Tensor, iters: int | None = None) -> torch.Tensor:
    """left/right (B,3,H,W) RGB 0..255 of any size -> disparity (B,1,H,W) fp32 in pixels. Runs in eval mode."""
    if left.shape != right.shape:
        raise ValueError(f"left and right images differ in shape: {tuple(left.shape)} vs {tuple(right.shape)}")
    was_training = model.training
    model.eval()
    padder = InputPadder(*left.shape[-2:])
    try:
        with torch.no_grad():
            disp = model(padder.pad_tensor(left.float()), padder.pad_tensor(right.float()), iters=iters,
                         test_mode=True)
    finally:
        model.train(was_training)
    return padder.unpad(disp.float())
