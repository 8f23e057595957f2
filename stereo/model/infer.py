"""Inference on any image size: replicate-pad to a multiple of 32, run in test mode, crop back; optionally
hierarchical (the released `run_hierachical`, for images over about 1K: a half-resolution pass starts the full one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stereo.model.precision import upcast

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


def predict(model: nn.Module, left: torch.Tensor, right: torch.Tensor, iters: int | None = None,
            hierarchical: bool = False) -> torch.Tensor:
    """left/right (B,3,H,W) RGB 0..255 of any size -> disparity (B,1,H,W) fp32 in pixels. Runs in eval mode.
    `hierarchical`: first a pass at half resolution, whose disparity starts the full-resolution one."""
    if left.shape != right.shape:
        raise ValueError(f"left and right images differ in shape: {tuple(left.shape)} vs {tuple(right.shape)}")
    left, right = upcast(left), upcast(right)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            start = None
            if hierarchical:
                half = [F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False) for x in (left, right)]
                start = _quarter_resolution_start(_test_mode(model, *half, iters), left.shape[-2:])
            return _test_mode(model, left, right, iters, start)
    finally:
        model.train(was_training)


def _test_mode(model: nn.Module, left: torch.Tensor, right: torch.Tensor, iters: int | None,
               init_disp: torch.Tensor | None = None) -> torch.Tensor:
    padder = InputPadder(*left.shape[-2:])
    disp = model(padder.pad_tensor(left), padder.pad_tensor(right), iters=iters, test_mode=True, init_disp=init_disp)
    return padder.unpad(upcast(disp))


def _quarter_resolution_start(half_disp: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The half-resolution disparity upsampled to `size` and doubled, padded like the images, then brought to the
    model's 1/4 resolution (values / 4). As released, it is also shifted by the left padding: in the released code
    this start is offset from the images' own disparity by that many pixels, and the iterations correct it."""
    padder = InputPadder(*size)
    full = (F.interpolate(half_disp, size=size, mode="bilinear", align_corners=True) * 2.0).clamp(min=0)
    full = padder.pad_tensor(full) + padder.pad[0]
    return F.interpolate(full, scale_factor=0.25, mode="bilinear", align_corners=True) * 0.25
