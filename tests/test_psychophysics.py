"""Tests of psychophysics stimuli, decisions, normalization and the distance to humans.

The importance maps are the vendored object silhouettes, stand-ins for Clicktionary maps.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from harmonizer.evaluation import psychophysics
from tests.conftest import PHOTOS_DIR, load_manifest, mask_path

SIDE = 64


def _photos_and_maps(count: int) -> tuple[np.ndarray, np.ndarray]:
    rows = [row for row in load_manifest() if os.path.exists(mask_path(row))][:count]
    images, maps = [], []
    for row in rows:
        image = Image.open(os.path.join(PHOTOS_DIR, row["file"])).convert("RGB")
        images.append(np.asarray(image.resize((SIDE, SIDE)), np.float32))
        mask = Image.open(mask_path(row)).convert("L").resize((SIDE, SIDE))
        maps.append(np.asarray(mask, np.float32))
    return np.stack(images), np.stack(maps)


def test_default_levels_are_log_spaced():
    levels = psychophysics.default_levels()

    assert len(levels) == 11
    assert levels[0] == pytest.approx(1.0)
    assert levels[-1] == pytest.approx(100.0)
    np.testing.assert_allclose(np.diff(np.log10(levels)), 0.2)


def test_revealed_count_is_equal_across_images():
    images, maps = _photos_and_maps(4)
    # Silhouettes are binary, so most pixels tie; the count must still be exact.
    levels = psychophysics.default_levels()

    _, masks = psychophysics.make_stimuli(images, maps, levels, seed=0)
    counts = masks.sum(axis=(2, 3))

    for level_index, level in enumerate(levels):
        expected = psychophysics.revealed_count(level, SIDE, SIDE)
        assert counts[level_index].tolist() == [expected] * len(images)


def test_full_level_shows_whole_photo():
    images, maps = _photos_and_maps(2)

    stimuli, masks = psychophysics.make_stimuli(images, maps, [100.0], seed=0)

    assert masks.all()
    np.testing.assert_allclose(stimuli[0], images, atol=1e-4)


def test_background_keeps_amplitude_spectrum():
    images, _ = _photos_and_maps(2)
    rng = np.random.default_rng(0)

    for image in images:
        background = psychophysics.phase_scrambled_background(image, rng)
        expected = np.abs(np.fft.fft2(image, axes=(0, 1)))
        found = np.abs(np.fft.fft2(background, axes=(0, 1)))
        np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-6 * expected.max())
        assert background.mean() == pytest.approx(image.mean())
        # The phase is scrambled, so the background is not the photo.
        assert np.abs(background - image).mean() > 10.0


def test_revealed_pixels_are_centered_and_most_important():
    importance = np.zeros((SIDE, SIDE))
    importance[2:10, 40:60] = 1.0  # An important patch off-center, in the upper right.
    image = np.random.default_rng(1).uniform(0, 255, (SIDE, SIDE, 3))
    background = np.zeros_like(image)
    level = 100.0 * 8 * 20 / SIDE**2

    stimulus, mask = psychophysics.make_stimulus(image, importance, level, background)
    rows, columns = np.nonzero(mask)

    assert mask.sum() == 8 * 20
    assert (rows.min() + rows.max()) / 2 == pytest.approx((SIDE - 1) / 2, abs=0.5)
    assert (columns.min() + columns.max()) / 2 == pytest.approx((SIDE - 1) / 2, abs=0.5)
    np.testing.assert_array_equal(stimulus[mask].reshape(8, 20, 3), image[2:10, 40:60])


def test_decisions_use_animal_classes():
    def logits_fn(images):
        # Class 10 (animal) for bright images, class 500 (not an animal) for dark ones.
        bright = np.asarray(images).mean(axis=(1, 2, 3)) > 100
        logits = np.zeros((len(bright), 1000), np.float32)
        logits[bright, 10] = 1.0
        logits[~bright, 500] = 1.0
        return logits

    stimuli = np.zeros((2, 3, 8, 8, 3), np.float32)
    stimuli[0, 1] = 200.0
    stimuli[1] = 200.0

    result = psychophysics.decisions(logits_fn, stimuli, image_size=None, batch_size=2)

    np.testing.assert_array_equal(result, [[False, True, False], [True, True, True]])
    np.testing.assert_array_equal(
        psychophysics.is_animal_class(np.array([0, 397, 398, 999])), [True, True, False, False]
    )


def test_normalize_curve_is_min_max():
    normalized, flat = psychophysics.normalize_curve(np.array([0.5, 0.6, 0.9]))
    flat_curve, is_flat = psychophysics.normalize_curve(np.array([0.7, 0.7]))

    np.testing.assert_allclose(normalized, [0.0, 0.25, 1.0])
    assert not flat
    np.testing.assert_array_equal(flat_curve, [0.0, 0.0])
    assert is_flat


def test_report_distance_to_human_curve(tmp_path):
    path = tmp_path / "human.csv"
    path.write_text("level,accuracy\n1,0.5\n10,0.7\n100,0.9\n")
    levels = np.array([1.0, 10.0, 100.0])
    # 4 images: accuracies 0.5, 0.5, 1.0 -> normalized 0, 0, 1; humans 0, 0.5, 1.
    correct = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)

    report = psychophysics.psychophysics_report(
        correct, levels, psychophysics.read_human_curve(str(path)), resamples=50
    )

    assert report["normalized_accuracy"] == [0.0, 0.0, 1.0]
    assert report["l2_distance_to_humans"]["value"] == pytest.approx(0.5)
    assert report["l2_distance_to_humans"]["bootstrap_std"] >= 0.0


def test_human_curve_must_cover_model_levels(tmp_path):
    path = tmp_path / "human.csv"
    path.write_text("level,accuracy\n10,0.5\n100,0.9\n")
    human = psychophysics.read_human_curve(str(path))

    with pytest.raises(ValueError, match="exceed the human curve's range"):
        psychophysics.curve_distance(np.array([1.0, 100.0]), np.zeros(2), *human)


@pytest.mark.parametrize(
    "text, message",
    [
        ("percent,acc\n1,0.5\n100,0.9\n", "needs 'level' and 'accuracy' columns"),
        ("level,accuracy\n1,0.5\n", "at least 2 levels"),
        ("level,accuracy\n1,0.5\n100,1.5\n", "accuracies in"),
    ],
)
def test_invalid_human_curve_is_rejected(tmp_path, text, message):
    path = tmp_path / "human.csv"
    path.write_text(text)

    with pytest.raises(ValueError, match=message):
        psychophysics.read_human_curve(str(path))


@pytest.mark.parametrize("level", [0.0, -5.0, 150.0])
def test_invalid_level_is_rejected(level):
    with pytest.raises(ValueError, match="level must be a percentage"):
        psychophysics.revealed_count(level, SIDE, SIDE)
