"""Tests of the learning-rate schedules, tabulated against their formulas."""

import math

import keras
import numpy as np
import pytest

from harmonizer import schedules

PEAK = 0.3
# The ImageNet recipe: 1,281,167 training images at a global batch of 512 give 2502 steps per
# epoch, 5 epochs of warm-up and 90 epochs in all.
STEPS_PER_EPOCH = 1_281_167 // 512
WARMUP = 5 * STEPS_PER_EPOCH
TOTAL = 90 * STEPS_PER_EPOCH


def _cosine_formula(step: int) -> float:
    if step < WARMUP:
        return PEAK * step / WARMUP
    progress = min(max((step - WARMUP) / (TOTAL - WARMUP), 0.0), 1.0)
    return PEAK * 0.5 * (1.0 + math.cos(math.pi * progress))


COSINE_TABLE = [
    (0, 0.0),
    (WARMUP - 1, PEAK * (WARMUP - 1) / WARMUP),
    (WARMUP, PEAK),
    (WARMUP + 1, PEAK * 0.5 * (1.0 + math.cos(math.pi / (TOTAL - WARMUP)))),
    (TOTAL - 1, PEAK * 0.5 * (1.0 + math.cos(math.pi * (TOTAL - 1 - WARMUP) / (TOTAL - WARMUP)))),
    (TOTAL, 0.0),
]


@pytest.mark.parametrize(("step", "expected"), COSINE_TABLE)
def test_warmup_cosine_table(step, expected):
    schedule = schedules.WarmupCosine(PEAK, WARMUP, TOTAL)
    assert expected == pytest.approx(_cosine_formula(step), abs=1e-12)
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-7)


def test_warmup_cosine_peak_and_continuity():
    schedule = schedules.WarmupCosine(PEAK, WARMUP, TOTAL)
    rates = [float(schedule(step)) for step in range(WARMUP - 3, WARMUP + 4)]
    assert max(rates) == pytest.approx(PEAK, rel=1e-6)
    # Continuous at the end of warm-up: neighbouring steps differ by about PEAK / WARMUP.
    assert np.max(np.abs(np.diff(rates))) < 1.01 * PEAK / WARMUP


def test_warmup_cosine_never_negative_or_rising_after_peak():
    schedule = schedules.WarmupCosine(PEAK, WARMUP, TOTAL)
    steps = np.linspace(0, TOTAL + 1000, 2001).astype(int)
    rates = np.array([float(schedule(step)) for step in steps])
    assert rates.min() >= 0.0
    after_peak = rates[steps >= WARMUP]
    assert np.all(np.diff(after_peak) <= 1e-7)
    assert float(schedule(TOTAL + 10_000)) == 0.0


def test_warmup_cosine_without_warmup_starts_at_peak():
    schedule = schedules.WarmupCosine(PEAK, 0, TOTAL)
    assert float(schedule(0)) == pytest.approx(PEAK)


def test_warmup_cosine_round_trips_config():
    schedule = schedules.WarmupCosine(PEAK, WARMUP, TOTAL)
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule)
    )
    assert float(restored(WARMUP + 7)) == pytest.approx(float(schedule(WARMUP + 7)))


@pytest.mark.parametrize(
    ("peak", "warmup", "total", "message"),
    [(0.0, 1, 10, "peak"), (0.1, -1, 10, "warmup_steps"), (0.1, 10, 10, "total_steps")],
)
def test_warmup_cosine_rejects_bad_arguments(peak, warmup, total, message):
    with pytest.raises(ValueError, match=message):
        schedules.WarmupCosine(peak, warmup, total)


DECAY_EPOCHS = (30, 50, 80)
BOUNDARIES = [epoch * STEPS_PER_EPOCH for epoch in DECAY_EPOCHS]


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),
        (WARMUP - 1, PEAK * (WARMUP - 1) / WARMUP),
        (WARMUP, PEAK),
        (BOUNDARIES[0] - 1, PEAK),
        (BOUNDARIES[0], PEAK * 0.1),
        (BOUNDARIES[1] - 1, PEAK * 0.1),
        (BOUNDARIES[1], PEAK * 0.01),
        (BOUNDARIES[2], PEAK * 0.001),
        (TOTAL - 1, PEAK * 0.001),
        (TOTAL, PEAK * 0.001),
    ],
)
def test_warmup_piecewise_table(step, expected):
    schedule = schedules.WarmupPiecewise(PEAK, WARMUP, BOUNDARIES, 0.1)
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-9)


def test_warmup_piecewise_round_trips_config():
    schedule = schedules.WarmupPiecewise(PEAK, WARMUP, BOUNDARIES, 0.1)
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule)
    )
    for step in (WARMUP // 2, BOUNDARIES[1] + 3):
        assert float(restored(step)) == pytest.approx(float(schedule(step)))


@pytest.mark.parametrize(
    ("boundaries", "factor", "message"),
    [
        ([], 0.1, "boundaries"),
        ([50, 30], 0.1, "boundaries"),
        ([WARMUP - 1], 0.1, "boundaries"),
        (BOUNDARIES, 1.0, "decay_factor"),
        (BOUNDARIES, 0.0, "decay_factor"),
    ],
)
def test_warmup_piecewise_rejects_bad_arguments(boundaries, factor, message):
    with pytest.raises(ValueError, match=message):
        schedules.WarmupPiecewise(PEAK, WARMUP, boundaries, factor)
