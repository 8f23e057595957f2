"""The training loss against values computed by hand."""

import math

import pytest
import torch

from stereo.config.schema import LossConfig
from stereo.train.loss import sequence_weights, stereo_loss, upsample_init


def test_sequence_weights_plain_and_rescaled():
    assert sequence_weights(3, LossConfig(gamma=0.9)) == pytest.approx([0.81, 0.9, 1.0])
    rescaled = 0.9 ** (15 / 3)  # N=4: gamma' = gamma^(15/(N-1))
    assert sequence_weights(4, LossConfig(gamma=0.9, rescale_gamma=True)) == pytest.approx(
        [rescaled**3, rescaled**2, rescaled, 1.0])


def test_upsample_init_scales_values_by_four():
    init = torch.full((1, 1, 2, 3), 1.5)
    up = upsample_init(init)
    assert up.shape == (1, 1, 8, 12)
    assert torch.allclose(up, torch.full_like(up, 6.0))


def test_l1_sequence_and_smooth_l1_init_by_hand():
    gt = torch.full((1, 1, 4, 4), 10.0)
    valid = torch.ones_like(gt, dtype=torch.bool)
    init = torch.full((1, 1, 1, 1), 2.25)  # x4 -> 9.0: error 1.0 everywhere, smooth-L1(1.0) = 0.5
    preds = [torch.full_like(gt, 7.0), torch.full_like(gt, 12.0)]  # errors 3 and 2
    cfg = LossConfig(init_kind="smooth_l1", seq_kind="l1", init_weight=1.0, gamma=0.9)
    terms = stereo_loss(init, preds, gt, valid, max_disp=64, cfg=cfg)
    assert terms["init"].item() == pytest.approx(0.5)
    assert terms["seq"].item() == pytest.approx(0.9 * 3 + 1.0 * 2)
    assert terms["total"].item() == pytest.approx(0.5 + 4.7)
    assert terms["epe"].item() == pytest.approx(2.0)


def test_invalid_and_out_of_range_pixels_are_ignored():
    gt = torch.tensor([[[[4.0, 0.0], [70.0, 8.0]]]])  # 0 (invalid) and 70 >= max_disp are excluded
    valid = torch.tensor([[[[True, True], [True, False]]]])  # the 8.0 pixel is masked out
    pred = torch.tensor([[[[5.5, 100.0], [100.0, 100.0]]]])
    gt, valid, pred = (t.repeat_interleave(2, -1).repeat_interleave(2, -2) for t in (gt, valid, pred))  # 4x4
    init = torch.zeros(1, 1, 1, 1)  # upsampled: 0 everywhere -> error 4 at the valid pixels
    cfg = LossConfig(init_kind="l1", seq_kind="smooth_l1", init_weight=0.5)
    terms = stereo_loss(init, [pred], gt, valid, max_disp=64, cfg=cfg)
    assert terms["init"].item() == pytest.approx(4.0)
    assert terms["seq"].item() == pytest.approx(1.5 - 0.5)  # smooth-L1 of 1.5
    assert terms["total"].item() == pytest.approx(0.5 * 4.0 + 1.0)


def test_epe_kind_and_no_valid_pixels_gives_zero_not_nan():
    gt = torch.zeros(1, 1, 4, 4)
    init = torch.ones(1, 1, 1, 1)
    terms = stereo_loss(init, [torch.ones_like(gt)], gt, torch.ones_like(gt, dtype=torch.bool), 64,
                        LossConfig(init_kind="epe", seq_kind="epe"))
    assert terms["total"].item() == 0.0 and not math.isnan(terms["epe"].item())


def test_gradient_flows_through_every_prediction_and_the_init():
    gt = torch.full((1, 1, 4, 4), 3.0)
    init = torch.zeros(1, 1, 1, 1, requires_grad=True)
    preds = [torch.zeros(1, 1, 4, 4, requires_grad=True) for _ in range(2)]
    stereo_loss(init, preds, gt, torch.ones_like(gt, dtype=torch.bool), 64, LossConfig())["total"].backward()
    assert init.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in preds)
    # l1 gradient of the last prediction: -1/16 per pixel (mean over 16 pixels, weight 1)
    assert torch.allclose(preds[1].grad, torch.full_like(gt, -1 / 16))
    assert torch.allclose(preds[0].grad, torch.full_like(gt, -0.9 / 16))
