"""Tests of the batched map metrics against scipy, identities and a plain NumPy reference."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from harmonizer import metrics


def _scipy_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    flat_a = a.reshape(len(a), -1)
    flat_b = b.reshape(len(b), -1)
    pairs = zip(flat_a, flat_b, strict=True)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        # A constant map makes scipy warn and return NaN, which the tests mask out.
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        return np.array([scipy.stats.spearmanr(x, y).statistic for x, y in pairs])


def _reference_top_membership(values: np.ndarray, fraction: float) -> np.ndarray:
    """Fractional top-fraction membership of one flat map, one tie group at a time."""
    size = values.size
    selected = fraction * size
    membership = np.zeros(size)
    ranks = scipy.stats.rankdata(values, method="average")
    for value in np.unique(values):
        members = values == value
        count = members.sum()
        last = ranks[members][0] + (count - 1) / 2
        first = last - count + 1
        cut = size - selected
        # Share of the group's rank interval (first - 1, last] that lies above the cut.
        overlap = max(0.0, last - max(first - 1, cut))
        membership[members] = min(overlap, count) / count
    return membership


def _reference_dice_iou(a: np.ndarray, b: np.ndarray, fraction: float) -> tuple[float, float]:
    membership_a = _reference_top_membership(a.ravel(), fraction)
    membership_b = _reference_top_membership(b.ravel(), fraction)
    intersection = np.minimum(membership_a, membership_b).sum()
    union = np.maximum(membership_a, membership_b).sum()
    return 2 * intersection / (membership_a.sum() + membership_b.sum()), intersection / union


def test_spearman_matches_scipy_on_ties():
    a = np.array([[1, 0, 4, 1, 0, 3, 0]], np.float32)
    b = np.array([[4, 0, 3, 3, 3, 1, 1]], np.float32)
    expected = scipy.stats.spearmanr(a[0], b[0]).statistic

    rho, valid = metrics.spearman(a, b)

    assert round(expected, 4) == 0.3529
    assert abs(float(rho[0]) - expected) < 1e-6
    assert bool(valid[0])


def test_rank_with_ties_matches_rankdata():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 6, size=(5, 40)).astype(np.float32)

    ranks = metrics.rank_with_ties(values).numpy()

    np.testing.assert_array_equal(ranks, scipy.stats.rankdata(values, method="average", axis=-1))


def test_rank_with_ties_of_float64_keeps_close_values_apart():
    values = np.array([[1.0, 1.0 + 1e-12, 1.0]])

    ranks = metrics.rank_with_ties(values).numpy()

    np.testing.assert_array_equal(ranks, [[1.5, 3.0, 1.5]])


def test_random_batch_matches_scipy():
    rng = np.random.default_rng(1)
    saliency = rng.normal(size=(16, 24, 24)).astype(np.float32)
    maps = rng.normal(size=(16, 24, 24)).astype(np.float32) + 0.5 * saliency
    # Quantize half of the human maps so that they contain many ties, as 8-bit maps do.
    maps[8:] = np.round(maps[8:] * 2)

    scores = metrics.map_scores(saliency, maps)

    np.testing.assert_allclose(scores.spearman.numpy(), _scipy_spearman(saliency, maps), atol=1e-6)
    assert scores.valid.numpy().all()


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.37])
def test_dice_iou_match_reference(fraction):
    rng = np.random.default_rng(2)
    saliency = rng.integers(0, 4, size=(6, 10, 10)).astype(np.float32)
    maps = rng.integers(0, 3, size=(6, 10, 10)).astype(np.float32)

    scores = metrics.map_scores(saliency, maps, fraction=fraction)

    for i in range(len(saliency)):
        dice, iou = _reference_dice_iou(saliency[i], maps[i], fraction)
        assert abs(float(scores.dice[i]) - dice) < 1e-6
        assert abs(float(scores.iou[i]) - iou) < 1e-6


def test_dice_iou_without_ties_equal_set_overlap():
    rng = np.random.default_rng(3)
    saliency = rng.normal(size=(4, 100))
    maps = rng.normal(size=(4, 100))

    dice, iou = metrics.dice_iou(saliency, maps, fraction=0.1)

    for i in range(4):
        top_a = set(np.argsort(saliency[i])[-10:])
        top_b = set(np.argsort(maps[i])[-10:])
        common = len(top_a & top_b)
        assert abs(float(dice[i]) - 2 * common / 20) < 1e-6
        assert abs(float(iou[i]) - common / len(top_a | top_b)) < 1e-6


def test_membership_sums_to_selected_count():
    values = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3]], np.float32)
    ranked = metrics.rank_maps(values)

    membership = metrics.top_fraction_membership(ranked, fraction=0.2).numpy()

    assert abs(membership.sum() - 3.0) < 1e-12
    # The five tied maxima share the three selected units.
    np.testing.assert_allclose(membership[0, 10:], 0.6)
    np.testing.assert_array_equal(membership[0, :10], 0.0)


@pytest.mark.parametrize(
    "maps",
    [
        np.random.default_rng(4).normal(size=(3, 16, 16)),
        np.random.default_rng(5).integers(0, 2, size=(3, 16, 16)),
        np.random.default_rng(6).integers(0, 3, size=(3, 16, 16)) * 50,
    ],
    ids=["continuous", "binary", "three_levels"],
)
def test_map_against_itself_scores_one(maps):
    scores = metrics.map_scores(maps, maps)

    np.testing.assert_allclose(scores.spearman.numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(scores.dice.numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(scores.iou.numpy(), 1.0, atol=1e-6)


def test_constant_map_is_counted_not_nan():
    rng = np.random.default_rng(7)
    saliency = rng.normal(size=(4, 8, 8)).astype(np.float32)
    maps = rng.normal(size=(4, 8, 8)).astype(np.float32)
    maps[2] = 0.5

    scores = metrics.map_scores(saliency, maps)
    valid = scores.valid.numpy()
    mean = scores.spearman.numpy()[valid].mean()

    assert np.isfinite(mean)
    assert int((~valid).sum()) == 1
    assert int(scores.constant_map.numpy().sum()) == 1
    assert not scores.constant_saliency.numpy().any()
    np.testing.assert_allclose(
        scores.spearman.numpy()[valid], _scipy_spearman(saliency, maps)[valid], atol=1e-6
    )
    assert np.isfinite(scores.dice.numpy()).all()
    assert np.isfinite(scores.iou.numpy()).all()


def test_nonfinite_map_is_invalid():
    saliency = np.arange(20, dtype=np.float32).reshape(2, 10)
    maps = saliency[::-1].copy()
    maps[1, 3] = np.nan

    scores = metrics.map_scores(saliency, maps)

    np.testing.assert_array_equal(scores.valid.numpy(), [True, False])
    np.testing.assert_array_equal(scores.nonfinite.numpy(), [False, True])
    assert np.isfinite(scores.spearman.numpy()).all()


def test_compiled_scores_equal_eager():
    rng = np.random.default_rng(8)
    saliency = tf.constant(rng.normal(size=(5, 12, 12)), tf.float32)
    maps = tf.constant(rng.integers(0, 4, size=(5, 12, 12)), tf.float32)
    compiled = tf.function(metrics.map_scores, jit_compile=True)
    unknown_batch = tf.function(
        metrics.map_scores,
        input_signature=[tf.TensorSpec([None, 12, 12]), tf.TensorSpec([None, 12, 12])],
    )

    eager = metrics.map_scores(saliency, maps)

    for scores in (compiled(saliency, maps), unknown_batch(saliency, maps)):
        np.testing.assert_allclose(scores.spearman.numpy(), eager.spearman.numpy(), atol=1e-7)
        np.testing.assert_allclose(scores.dice.numpy(), eager.dice.numpy(), atol=1e-7)
        np.testing.assert_allclose(scores.iou.numpy(), eager.iou.numpy(), atol=1e-7)


def test_alignment_divides_by_ceiling():
    rho = tf.constant([0.65753, 0.0, -0.3])

    np.testing.assert_allclose(metrics.alignment(rho).numpy(), [1.0, 0.0, -0.3 / 0.65753])
    assert metrics.HUMAN_CEILING_CLICKME == 0.65753


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_invalid_fraction_is_rejected(fraction):
    maps = np.ones((1, 4))

    with pytest.raises(ValueError, match="fraction must be in"):
        metrics.map_scores(maps, maps, fraction=fraction)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same shape"):
        metrics.map_scores(np.ones((2, 4, 4)), np.ones((2, 8, 8)))


def test_unbatched_map_is_rejected():
    with pytest.raises(ValueError, match="add a batch axis"):
        metrics.spearman(np.arange(5.0), np.arange(5.0))


def test_invalid_ceiling_is_rejected():
    with pytest.raises(ValueError, match="ceiling must be > 0"):
        metrics.alignment(tf.constant([0.5]), ceiling=0.0)
