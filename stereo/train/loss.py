"""The training loss (paper Eq. 11): init_weight * L_init(d0) + sum_i w_i * L_seq(d_i), in fp32.

Each term is returned separately for logging. Valid pixels: the sample's mask and 0 < gt < max_disp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stereo.config.schema import LossConfig


def _pixel_error(pred: torch.Tensor, gt: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, gt, reduction="none")
    if kind in ("l1", "epe"):  # for 1-channel disparity the end-point error is the absolute error
        return (pred - gt).abs()
    raise ValueError(f"loss kind: smooth_l1, l1 or epe, got {kind!r}")


def _masked_mean(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # clamp: a batch without valid pixels contributes 0, not NaN
    return (err * mask).sum() / mask.sum().clamp(min=1)


def sequence_weights(n: int, cfg: LossConfig) -> list[float]:
    """w_i = gamma^(N-1-i); with rescale_gamma RAFT-Stereo's gamma^(15/(N-1)) replaces gamma."""
    gamma = cfg.gamma ** (15 / (n - 1)) if cfg.rescale_gamma and n > 1 else cfg.gamma
    return [gamma ** (n - 1 - i) for i in range(n)]


def upsample_init(init_disp: torch.Tensor) -> torch.Tensor:
    """1/4-resolution disparity -> full resolution, values scaled x4 (bilinear, align_corners=True)."""
    return 4.0 * F.interpolate(init_disp, scale_factor=4, mode="bilinear", align_corners=True)


def stereo_loss(init_disp: torch.Tensor, preds: list[torch.Tensor], gt: torch.Tensor, valid: torch.Tensor,
                max_disp: float, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """`total`, `init`, `seq` (weighted sums as in the total) and `epe` (last prediction, for logging)."""
    gt = gt.float()
    mask = (valid.bool() & (gt > 0) & (gt < max_disp)).float()
    init = _masked_mean(_pixel_error(upsample_init(init_disp.float()), gt, cfg.init_kind), mask)
    seq = gt.new_zeros(())
    for weight, pred in zip(sequence_weights(len(preds), cfg), preds):
        seq = seq + weight * _masked_mean(_pixel_error(pred.float(), gt, cfg.seq_kind), mask)
    with torch.no_grad():
        epe = _masked_mean((preds[-1].float() - gt).abs(), mask)
    return {"total": cfg.init_weight * init + seq, "init": init.detach(), "seq": seq.detach(), "epe": epe}
