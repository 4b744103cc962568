"""Tests of the shortcut task, the alignment scorer, the abs-saliency loss option and the
reduced shortcut benchmark (a harmonized model must beat the baseline on the unbiased split)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from harmonizer import alignment, losses, metrics, saliency, shortcut, shortcut_benchmark
from harmonizer.model import Harmonizer

SMALL = shortcut.ShortcutConfig(image_size=32, num_classes=4, object_size_range=(12, 16))


def test_split_is_deterministic():
    first = shortcut.generate_split(SMALL, 40, biased=True, seed=3)
    second = shortcut.generate_split(SMALL, 40, biased=True, seed=3)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.maps, second.maps)
    np.testing.assert_array_equal(first.labels, second.labels)


def test_split_shapes_and_balance():
    split = shortcut.generate_split(SMALL, 100, biased=True, seed=0)
    assert split.images.shape == (100, 32, 32, 3)
    assert split.images.dtype == np.uint8
    assert split.maps.shape == (100, 32, 32)
    assert set(np.unique(split.maps)) == {0.0, 1.0}
    np.testing.assert_array_equal(np.bincount(split.labels), [25, 25, 25, 25])


def test_biased_split_patch_predicts_label():
    split = shortcut.generate_split(SMALL, 200, biased=True, seed=0)
    assert split.shortcut_agreement == 1.0
    patch = split.images[:, : SMALL.patch_size, : SMALL.patch_size].reshape(200, -1, 3)
    expected = np.array(shortcut.PATCH_PALETTE)[split.labels]
    np.testing.assert_array_equal(patch, np.broadcast_to(expected[:, None], patch.shape))


def test_unbiased_split_patch_is_random():
    split = shortcut.generate_split(SMALL, 2000, biased=False, seed=0)
    # Independent patch: agreement ~ 1 / num_classes (binomial sd ~ 0.01).
    assert abs(split.shortcut_agreement - 0.25) < 0.04


def test_shortcut_rate_sets_agreement():
    config = shortcut.ShortcutConfig(object_size_range=(12, 16), shortcut_rate=0.5)
    split = shortcut.generate_split(config, 2000, biased=True, seed=0)
    # 0.5 kept + 0.5 * 1/4 by chance = 0.625.
    assert abs(split.shortcut_agreement - 0.625) < 0.04


def test_maps_avoid_corner_patch():
    split = shortcut.generate_split(SMALL, 200, biased=True, seed=1)
    size = SMALL.patch_size
    assert split.maps[:, : size + 1, : size + 1].sum() == 0.0
    assert (split.maps.sum(axis=(1, 2)) > 40).all()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_classes", 1, "num_classes"),
        ("num_classes", 99, "num_classes"),
        ("object_size_range", (3, 4), "object_size_range"),
        ("object_size_range", (12, 10), "object_size_range"),
        ("patch_size", 0, "patch_size"),
        ("image_size", 16, "image_size"),
        ("clutter_count", -1, "clutter_count"),
        ("shortcut_rate", 1.5, "shortcut_rate"),
    ],
)
def test_config_rejects_bad_field(field, value, message):
    config = shortcut.ShortcutConfig(**{"object_size_range": (12, 16), field: value})
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_generate_rejects_empty_split():
    with pytest.raises(ValueError, match="num_examples"):
        shortcut.generate_split(SMALL, 0, biased=True, seed=0)


def test_shape_mask_areas():
    size = 200
    assert shortcut.shape_mask("disk", size).mean() == pytest.approx(np.pi / 4, abs=0.01)
    assert shortcut.shape_mask("diamond", size).mean() == pytest.approx(0.5, abs=0.01)
    assert shortcut.shape_mask("square", size).mean() == 1.0
    with pytest.raises(ValueError, match="shape must be one of"):
        shortcut.shape_mask("star", size)


@pytest.mark.parametrize("texture", shortcut.TEXTURES)
def test_texture_is_periodic(texture):
    pattern = shortcut.texture_pattern(texture, 16, (0, 0))
    period = shortcut.TEXTURE_PERIOD
    np.testing.assert_array_equal(pattern[period:], pattern[:-period])
    np.testing.assert_array_equal(pattern[:, period:], pattern[:, :-period])
    assert 0.0 < pattern.mean() < 1.0


def test_textures_differ():
    patterns = [shortcut.texture_pattern(t, 8, (0, 0)) for t in shortcut.TEXTURES]
    for i in range(len(patterns)):
        for j in range(i + 1, len(patterns)):
            assert not np.array_equal(patterns[i], patterns[j])


def test_coverage_flags_count():
    flags = shortcut.map_coverage_flags(1000, 0.3, seed=0)
    assert flags.sum() == 300
    assert set(np.unique(flags)) == {0.0, 1.0}
    with pytest.raises(ValueError, match="fraction"):
        shortcut.map_coverage_flags(10, 1.2, seed=0)


def _linear_model(weights: np.ndarray) -> keras.Model:
    """logit_k = sum(weights[k] * image): the input gradient of class k is weights[k]."""
    inputs = keras.Input(weights.shape[1:])
    flat = keras.layers.Flatten()(inputs)
    dense = keras.layers.Dense(len(weights), use_bias=False)
    model = keras.Model(inputs, dense(flat))
    dense.set_weights([weights.reshape(len(weights), -1).T])
    return model


def test_score_saliency_matches_scipy():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    model = _linear_model(weights)
    images = rng.uniform(0, 255, (3, 8, 8, 3)).astype(np.float32)
    labels = np.array([0, 1, 1])
    maps = rng.uniform(size=(3, 8, 8)).astype(np.float32)

    scores = alignment.score_saliency(model, images, labels, maps, batch_size=2)

    for index, label in enumerate(labels):
        signed = weights[label].mean(axis=-1)
        absolute = np.abs(weights[label]).max(axis=-1)
        for definition, expected_map in (("signed_mean", signed), ("abs_max", absolute)):
            rho = scipy.stats.spearmanr(expected_map.ravel(), maps[index].ravel())[0]
            for mode in ("inference", "training"):
                value = scores.per_example[(definition, mode)][index]
                assert value == pytest.approx(rho / metrics.HUMAN_CEILING_CLICKME, abs=1e-5)


def test_score_saliency_map_against_itself():
    rng = np.random.default_rng(1)
    weights = np.abs(rng.normal(size=(1, 8, 8, 1))).astype(np.float32)
    scores = alignment.score_saliency(
        _linear_model(weights),
        np.zeros((2, 8, 8, 1), np.float32),
        np.zeros(2, int),
        np.repeat(weights[..., 0], 2, axis=0),
        modes=("inference",),
    )
    expected = 1.0 / metrics.HUMAN_CEILING_CLICKME
    assert scores.alignment[("abs_max", "inference")] == pytest.approx(expected, abs=1e-5)
    assert scores.accuracy == 1.0


def test_score_saliency_counts_constant_map():
    weights = np.ones((1, 4, 4, 1), np.float32)
    scores = alignment.score_saliency(
        _linear_model(weights),
        np.zeros((1, 4, 4, 1), np.float32),
        np.zeros(1, int),
        np.ones((1, 4, 4), np.float32),
        modes=("inference",),
    )
    assert scores.num_invalid[("abs_max", "inference")] == 1
    assert np.isnan(scores.alignment[("abs_max", "inference")])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": np.zeros(3, int)}, "same length"),
        ({"maps": np.zeros((2, 4, 4), np.float32)}, "match the images"),
        ({"modes": ("eval",)}, "modes must be among"),
    ],
)
def test_score_saliency_rejects_bad_input(kwargs, message):
    arguments = {
        "model": _linear_model(np.ones((1, 8, 8, 1), np.float32)),
        "images": np.zeros((2, 8, 8, 1), np.float32),
        "labels": np.zeros(2, int),
        "maps": np.zeros((2, 8, 8), np.float32),
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        alignment.score_saliency(**arguments)


def test_abs_harmonizer_rejects_unknown_definition():
    backbone = shortcut_benchmark.build_tiny_cnn(4, 32)
    with pytest.raises(ValueError, match="saliency_definition"):
        Harmonizer(backbone, saliency_definition="abs_mean")


def test_abs_harmonizer_trains_abs_saliency():
    # One step with only the harmonization term: the loss it reports must equal the pyramid
    # loss of the abs_max saliency computed here, before the step.
    keras.utils.set_random_seed(0)
    split = shortcut.generate_split(SMALL, 8, biased=True, seed=0)
    backbone = shortcut_benchmark.build_tiny_cnn(4, 32)
    model = Harmonizer(backbone, saliency_definition="abs_max")
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    images = split.images.astype(np.float32)
    expected_saliency = saliency.saliency_maps(backbone, images, split.labels, "abs_max")
    expected = float(
        tf.reduce_mean(losses.per_example_harmonization_loss(expected_saliency, split.maps))
    )
    features = {"image": images, "map": split.maps, "has_map": np.ones(8, np.float32)}
    history = model.fit(features, split.labels, batch_size=8, epochs=1, verbose=0)
    assert history.history["harmonization"][0] == pytest.approx(expected, rel=1e-4)


def test_reduced_benchmark_direction():
    config = shortcut_benchmark.BenchmarkConfig(
        num_train=1000,
        num_test=300,
        steps=400,
        batch_size=32,
        harmonization_weight=2.0,
        seeds=(0,),
        variants=("baseline", "abs"),
        sweep_fractions=(),
    )
    rows, _ = shortcut_benchmark.run_benchmark(config, log=lambda message: None)
    baseline, harmonized = rows
    assert harmonized["accuracy"] > baseline["accuracy"] + 0.1, rows
    assert harmonized["abs_max/inference"] > baseline["abs_max/inference"] + 0.2, rows
    # No BatchNorm in the tiny CNN: both modes give the same saliency.
    assert harmonized["abs_max/training"] == pytest.approx(harmonized["abs_max/inference"])
