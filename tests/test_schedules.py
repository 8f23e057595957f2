"""Learning-rate schedules are pure functions of the step."""

import math

import pytest

from stereo.config.schema import ScheduleConfig
from stereo.train.schedules import lr_multiplier


def test_paper_step_schedule_decays_at_80_percent():
    cfg = ScheduleConfig(kind="step", decay_at=0.8, decay_factor=0.1)
    assert lr_multiplier(0, 1000, cfg) == 1.0
    assert lr_multiplier(799, 1000, cfg) == 1.0
    assert lr_multiplier(800, 1000, cfg) == pytest.approx(0.1)
    assert lr_multiplier(999, 1000, cfg) == pytest.approx(0.1)


def test_linear_warmup_applies_to_every_kind():
    for kind in ("step", "cosine", "onecycle", "constant"):
        cfg = ScheduleConfig(kind=kind, warmup_steps=10)
        assert lr_multiplier(0, 100, cfg) == pytest.approx(0.1)
        assert lr_multiplier(4, 100, cfg) == pytest.approx(0.5)
        assert lr_multiplier(9, 100, cfg) == pytest.approx(1.0)


def test_cosine_from_peak_to_min_ratio():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_ratio=0.1)
    assert lr_multiplier(10, 110, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway
    assert lr_multiplier(110, 110, cfg) == pytest.approx(0.1)
    values = [lr_multiplier(s, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_onecycle_rises_then_anneals():
    cfg = ScheduleConfig(kind="onecycle", pct_start=0.25, min_ratio=0.0)
    assert lr_multiplier(0, 100, cfg) == pytest.approx(0.0)
    assert lr_multiplier(25, 100, cfg) == pytest.approx(1.0)
    assert lr_multiplier(12, 100, cfg) == pytest.approx(0.48)
    assert lr_multiplier(100, 100, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(62, 100, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 37 / 75)))


def test_constant_and_purity():
    cfg = ScheduleConfig(kind="constant")
    assert {lr_multiplier(s, 50, cfg) for s in range(50)} == {1.0}
    step_cfg = ScheduleConfig(kind="cosine", warmup_steps=3)
    assert [lr_multiplier(s, 40, step_cfg) for s in range(40)] == [lr_multiplier(s, 40, step_cfg) for s in range(40)]
