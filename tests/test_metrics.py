"""Golden metric values worked out by hand (see the comments next to each case)."""

import math

import numpy as np
import pytest
import torch

from stereo.eval.metrics import MetricAccumulator, image_metrics

INF, NAN = float("inf"), float("nan")
# Evaluated pixels (gt finite and > 0): errors 0.5, 4, 4.5, 0, 2.5 at gt 10, 20, 100, 40, 50.
GT = np.array([[10, 20, 0, 100], [INF, 40, 50, NAN]], np.float32)
PRED = np.array([[10.5, 24, 5, 104.5], [1, 40, 47.5, 3]], np.float32)
NOCC = np.array([[1, 0, 1, 1], [1, 1, 0, 1]], bool)  # keeps errors 0.5 (gt 10), 4.5 (gt 100), 0 (gt 40)


def test_all_pixels_by_hand():
    m = image_metrics(PRED, GT)
    assert m["pixels"] == 5
    assert m["epe"] == pytest.approx(11.5 / 5)
    assert m["bp_0.5"] == pytest.approx(60.0)  # 4, 4.5, 2.5 (0.5 is not > 0.5)
    assert m["bp_1"] == pytest.approx(60.0)
    assert m["bp_2"] == pytest.approx(60.0)
    assert m["bp_3"] == pytest.approx(40.0)  # 4, 4.5
    assert m["bp_4"] == pytest.approx(20.0)  # 4.5 only (4 is not > 4)
    # D1: 4 px at gt 20 is > 3 and > 1 (5 %); 4.5 px at gt 100 is > 3 but not > 5 -> 1 of 5
    assert m["d1"] == pytest.approx(20.0)
    assert m["epe_noc"] is None and m["pixels_noc"] is None  # no nocc mask given


def test_non_occluded_region():
    m = image_metrics(PRED, GT, nocc=NOCC)
    assert m["pixels_noc"] == 3
    assert m["epe_noc"] == pytest.approx(5.0 / 3)
    assert m["bp_0.5_noc"] == pytest.approx(100 / 3)
    assert m["bp_4_noc"] == pytest.approx(100 / 3)
    assert m["d1_noc"] == pytest.approx(0.0)
    assert m["epe"] == pytest.approx(11.5 / 5)  # the all-pixel values do not change


def test_explicit_valid_mask_admits_zero_gt_but_never_inf_or_nan():
    valid = np.ones_like(GT, bool)
    m = image_metrics(PRED, GT, valid=valid)
    assert m["pixels"] == 6  # + the gt-0 pixel (error 5); the inf and NaN pixels stay out
    assert m["epe"] == pytest.approx(16.5 / 6)
    valid[0, 1] = False  # drop the 4 px error
    assert image_metrics(PRED, GT, valid=valid)["epe"] == pytest.approx(12.5 / 5)


def test_max_disp_cap_is_opt_in():
    assert image_metrics(PRED, GT)["pixels"] == 5
    capped = image_metrics(PRED, GT, max_disp=50)  # drops gt 100 and gt 50
    assert capped["pixels"] == 3
    assert capped["epe"] == pytest.approx(4.5 / 3)


def test_empty_mask_gives_none_and_is_left_out_of_means():
    acc = MetricAccumulator()
    a = acc.add(np.array([[1.0, 3.0]]), np.array([[2.0, 6.0]]))  # errors 1, 3: epe 2
    b = acc.add(np.array([[16.0]]), np.array([[10.0]]))  # error 6: epe 6
    empty = acc.add(np.array([[5.0, 5.0]]), np.array([[0.0, INF]]))  # nothing valid
    assert a["epe"] == pytest.approx(2.0) and b["epe"] == pytest.approx(6.0)
    assert empty["epe"] is None and empty["d1"] is None and empty["pixels"] == 0
    s = acc.summary()
    assert s["images"] == 3 and s["pixels"] == 3
    assert s["epe/pooled"] == pytest.approx(10.0 / 3)  # (1 + 3 + 6) / 3 pixels
    assert s["epe/mean_image"] == pytest.approx(4.0)  # (2 + 6) / 2 images; the empty one is left out
    assert s["bp_2/pooled"] == pytest.approx(200 / 3)  # 3 and 6 of 3 pixels
    assert s["bp_2/mean_image"] == pytest.approx(75.0)  # (50 + 100) / 2
    # D1: 3 px at gt 6 is not > 3; 6 px at gt 10 is > 3 and > 0.5 -> 1 of 3 pixels; per image 0 and 100
    assert s["d1/pooled"] == pytest.approx(100 / 3)
    assert s["d1/mean_image"] == pytest.approx(50.0)
    assert s["epe_noc/pooled"] is None and s["epe_noc/mean_image"] is None and s["pixels_noc"] == 0


def test_non_finite_prediction_counts_as_bad():
    m = image_metrics(np.array([[NAN, 2.0]]), np.array([[1.0, 2.0]]))
    assert math.isinf(m["epe"])
    assert m["bp_4"] == pytest.approx(50.0) and m["d1"] == pytest.approx(50.0)


def test_torch_inputs_with_batch_dims_match_numpy():
    t = image_metrics(torch.from_numpy(PRED)[None, None], torch.from_numpy(GT)[None], nocc=torch.from_numpy(NOCC))
    assert t == image_metrics(PRED, GT, nocc=NOCC)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="differ in shape"):
        image_metrics(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="valid mask shape"):
        image_metrics(np.zeros((2, 3)), np.ones((2, 3)), valid=np.ones((3, 3), bool))


def test_every_metric_key_names_its_unit():
    from stereo.eval.metrics import unit, with_unit

    assert [unit(k) for k in ("epe", "val/demo_val/epe_noc/pooled", "bp_0.5/mean_image", "val/d1/pooled")] == \
        ["px", "px", "%", "%"]
    assert unit("loss") == "" and with_unit("loss") == "loss" and with_unit("d1/pooled") == "d1/pooled (%)"
