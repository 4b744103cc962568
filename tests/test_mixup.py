"""Tests of mixup: shared permutation and weights, has-map rule, Beta sampler."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from harmonizer import augment

NUM_CLASSES = 8
BATCH = 8
SIZE = 4
ALPHA = 0.2


def _class_encoded_batch(has_map):
    """Images and maps whose pixels equal the example's class, so a mix can be decoded."""
    classes = np.array([3, 0, 5, 1, 7, 2, 6, 4], np.int32)
    images = np.broadcast_to(classes[:, None, None, None], (BATCH, SIZE, SIZE, 3))
    maps = np.broadcast_to(classes[:, None, None] + 1.0, (BATCH, SIZE, SIZE))
    features = {
        "image": tf.constant(images, tf.float32),
        "map": tf.constant(maps * has_map[:, None, None], tf.float32),
        "has_map": tf.constant(has_map, tf.float32),
    }
    return features, tf.constant(classes), classes


def _partners(targets, classes):
    """Decode the class each example was mixed with (its own class when mixed with itself)."""
    partners = []
    for i in range(BATCH):
        weights = targets[i].copy()
        weights[classes[i]] = 0.0
        partners.append(int(np.argmax(weights)) if weights.max() > 1e-7 else int(classes[i]))
    return partners


def test_mixup_same_permutation_and_weight():
    has_map = np.ones(BATCH, np.float32)
    features, labels, classes = _class_encoded_batch(has_map)
    mixed, targets = augment.mixup_batch(
        features, labels, ALPHA, NUM_CLASSES, tf.constant([1, 2], tf.int64)
    )
    targets = targets.numpy()
    images = mixed["image"].numpy()
    maps = mixed["map"].numpy()

    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    for i in range(BATCH):
        lam = targets[i, classes[i]]
        others = [c for c in np.flatnonzero(targets[i] > 1e-7) if c != classes[i]]
        # A pair of the same class (perm[i] == i) gives weight 1 on one class.
        partner = others[0] if others else classes[i]
        if others:
            assert len(others) == 1
            np.testing.assert_allclose(targets[i, partner], 1.0 - lam, rtol=1e-5, atol=1e-6)
        expected_image = lam * classes[i] + (1.0 - lam) * partner
        expected_map = lam * (classes[i] + 1.0) + (1.0 - lam) * (partner + 1.0)
        np.testing.assert_allclose(images[i], expected_image, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(maps[i], expected_map, rtol=1e-5, atol=1e-5)


def test_mixup_partners_form_permutation():
    """Decode each example's partner from its label and check they form a permutation."""
    has_map = np.ones(BATCH, np.float32)
    features, labels, classes = _class_encoded_batch(has_map)
    mixed, targets = augment.mixup_batch(
        features, labels, 1.0, NUM_CLASSES, tf.constant([3, 4], tf.int64)
    )
    partners = _partners(targets.numpy(), classes)
    assert sorted(partners) == sorted(classes.tolist())


def test_mixup_stratified_keeps_map_flags():
    has_map = np.array([1, 0, 1, 0, 1, 1, 0, 1], np.float32)
    features, labels, classes = _class_encoded_batch(has_map)
    class_has_map = dict(zip(classes.tolist(), has_map.tolist(), strict=True))
    for seed in range(5):
        mixed, targets = augment.mixup_batch(
            features, labels, 1.0, NUM_CLASSES, tf.constant([seed, 11], tf.int64)
        )
        np.testing.assert_array_equal(mixed["has_map"], has_map)
        partners = _partners(targets.numpy(), classes)
        assert sorted(partners) == sorted(classes.tolist())
        for i, partner in enumerate(partners):
            assert class_has_map[partner] == has_map[i]


def test_mixup_stratified_permutation_uniform_within_groups():
    has_map = tf.constant([1.0, 0.0, 1.0, 1.0, 0.0])
    draws = 2000
    draw_all = tf.function(
        lambda: tf.map_fn(
            lambda seed: augment.mixing_permutation(has_map, tf.stack([seed, 0]), True),
            tf.range(draws),
        )
    )
    permutations = draw_all().numpy()
    counts = np.zeros((5, 5))
    for permutation in permutations:
        counts[np.arange(5), permutation] += 1
    mapped, unmapped = [0, 2, 3], [1, 4]
    assert counts[np.ix_(mapped, unmapped)].sum() == 0
    assert counts[np.ix_(unmapped, mapped)].sum() == 0
    # 4 standard deviations of a frequency estimated from 2000 draws.
    np.testing.assert_allclose(counts[np.ix_(mapped, mapped)] / draws, 1 / 3, atol=0.045)
    np.testing.assert_allclose(counts[np.ix_(unmapped, unmapped)] / draws, 1 / 2, atol=0.045)


def test_mixup_unstratified_has_map_needs_both_maps():
    """A mapped image mixed with an unmapped one loses its map; the label is still mixed."""
    has_map = np.array([1, 0, 1, 0, 1, 1, 0, 1], np.float32)
    features, labels, classes = _class_encoded_batch(has_map)
    mixed, targets = augment.mixup_batch(
        features, labels, 1.0, NUM_CLASSES, tf.constant([5, 6], tf.int64), stratify_by_map=False
    )
    targets = targets.numpy()
    class_has_map = dict(zip(classes.tolist(), has_map.tolist(), strict=True))
    for i in range(BATCH):
        sources = [int(c) for c in np.flatnonzero(targets[i] > 1e-7)]
        expected = float(all(class_has_map[c] for c in sources))
        assert mixed["has_map"][i].numpy() == expected
        mixed_with_unmapped = len(sources) == 2 and expected == 0.0 and class_has_map[classes[i]]
        if mixed_with_unmapped:
            np.testing.assert_allclose(targets[i].sum(), 1.0, rtol=1e-6)
        if expected == 0.0:
            assert np.all(mixed["map"][i].numpy() == 0.0)


def test_mixup_lambda_matches_beta():
    # float64, because float32 rounds the draws within 6e-8 of 1 (about 2% of Beta(0.2, 0.2))
    # to exactly 1.0, and the Kolmogorov-Smirnov test sees that tie as a jump.
    draws = augment.sample_beta([100_000], ALPHA, tf.constant([7, 8], tf.int64), tf.float64)
    draws = draws.numpy()
    assert draws.shape == (100_000,)
    assert draws.min() >= 0.0
    assert draws.max() <= 1.0
    result = stats.kstest(draws, stats.beta(ALPHA, ALPHA).cdf)
    assert result.pvalue > 1e-3
    np.testing.assert_allclose(draws.mean(), 0.5, atol=0.01)
    np.testing.assert_allclose(draws.var(), stats.beta(ALPHA, ALPHA).var(), rtol=0.02)


def test_mixup_float32_lambda_moments():
    draws = augment.sample_beta([100_000], ALPHA, tf.constant([7, 8], tf.int64)).numpy()
    assert draws.dtype == np.float32
    np.testing.assert_allclose(draws.mean(), 0.5, atol=0.01)
    np.testing.assert_allclose(draws.var(), stats.beta(ALPHA, ALPHA).var(), rtol=0.02)


def test_mixup_batch_lambda_is_per_example_beta():
    """The label weights are one Beta(1, 1) draw per example, not one per batch."""
    batch = 20_000
    features = {
        "image": tf.zeros([batch, 1, 1, 3]),
        "map": tf.zeros([batch, 1, 1]),
        "has_map": tf.zeros([batch]),
    }
    # Half the batch is class 0 and half class 1; an example of class 0 mixed with one of
    # class 1 shows its weight as its class-0 label share.
    labels = tf.constant([0] * (batch // 2) + [1] * (batch // 2), tf.int32)
    _, targets = augment.mixup_batch(features, labels, 1.0, 2, tf.constant([9, 10], tf.int64))
    first_half = targets.numpy()[: batch // 2, 0]
    weights = first_half[first_half < 1.0]
    assert len(weights) > batch // 8
    assert stats.kstest(weights, stats.uniform().cdf).pvalue > 1e-3


def test_mixup_dataset_is_deterministic():
    has_map = np.ones(BATCH, np.float32)
    features, labels, _ = _class_encoded_batch(has_map)
    dataset = tf.data.Dataset.from_tensors((features, labels)).repeat(3)
    first = [t.numpy() for _, t in augment.mixup_dataset(dataset, ALPHA, NUM_CLASSES, seed=1)]
    second = [t.numpy() for _, t in augment.mixup_dataset(dataset, ALPHA, NUM_CLASSES, seed=1)]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[1])


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_mixup_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be > 0"):
        augment.sample_beta([2], alpha, tf.constant([0, 0], tf.int64))


def test_mixup_rejects_missing_map():
    with pytest.raises(ValueError, match="has_map"):
        augment.mixup_batch(
            {"image": tf.zeros([2, 2, 2, 3]), "map": tf.zeros([2, 2, 2])},
            tf.zeros([2], tf.int32),
            ALPHA,
            NUM_CLASSES,
            tf.constant([0, 0], tf.int64),
        )
