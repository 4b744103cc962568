"""The animal/non-animal psychophysics test: masked stimuli and normalized decision curves.

Each stimulus reveals the top p% most important pixels of a photo, with p log-spaced from 1 to
100, on a phase-scrambled noise background. This module fixes the details as follows:

* Pixel budget: at level p, exactly `round(p / 100 * H * W)` pixels are revealed, the same
  number for every image, so at 100% the whole photo is shown. Pixels are taken in decreasing
  importance, with ties broken by the distance to the image center (then by pixel index), so
  the count is exact whatever the ties.
* Centering: the revealed pixels are moved so that their bounding box is centered in the frame.
  The box fits in the frame, so no revealed pixel is lost.
* Background: per channel, the amplitude spectrum of the photo with the phase of one white-noise
  image shared by the three channels (the zero-frequency phase is kept at 0, so the mean is the
  photo's). Values are not clipped to [0, 255], because clipping would change the spectrum.
* Decision: a model answers "animal" when its top-1 class is one of ImageNet classes 0-397 (the
  animal synsets in sorted-synset order), as in the psychophysics code released with Fel et
  al. (2022).
* Normalization: each accuracy curve is min-max normalized, `(acc - min(acc)) / (max(acc) -
  min(acc))`, which is how the released code compares models and humans; speeded humans
  never reach perfect accuracy, so only the shape of the curve is compared. A flat curve has
  no shape and is reported as flat (normalized to zeros).
* Distance: the L2 norm of the difference between the model's and the human normalized curves
  at the model's levels (the human curve is interpolated linearly in log10(level)).

No human decision data ships with this project: the human curve is a CSV the user supplies.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

STIMULUS_SIZE = 256
NUM_LEVELS = 11
MIN_LEVEL_PERCENT = 1.0
MAX_LEVEL_PERCENT = 100.0
# ImageNet classes 0-397 (sorted-synset order) are animals; 398-999 are not.
NUM_ANIMAL_CLASSES = 398
PERCENT = 100.0


def default_levels(num_levels: int = NUM_LEVELS) -> np.ndarray:
    """Return `num_levels` percentages log-spaced from 1 to 100."""
    return np.logspace(np.log10(MIN_LEVEL_PERCENT), np.log10(MAX_LEVEL_PERCENT), num_levels)


def revealed_count(level_percent: float, height: int, width: int) -> int:
    """Return how many pixels a stimulus of `level_percent` reveals.

    Raises:
        ValueError: if the level is outside (0, 100].
    """
    if not 0.0 < level_percent <= PERCENT:
        raise ValueError(f"level must be a percentage in (0, 100], got {level_percent!r}")
    return max(1, int(round(level_percent / PERCENT * height * width)))


def reveal_order(importance: np.ndarray) -> np.ndarray:
    """Return flat pixel indices by decreasing importance, ties nearest the center first."""
    height, width = importance.shape
    rows, columns = np.mgrid[0:height, 0:width]
    distance = np.hypot(rows - (height - 1) / 2.0, columns - (width - 1) / 2.0).ravel()
    index = np.arange(height * width)
    # np.lexsort sorts by the last key first.
    return np.lexsort((index, distance, -importance.ravel().astype(np.float64)))


def phase_scrambled_background(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return noise with the amplitude spectrum of each channel of `image` and a random phase.

    Args:
        image: [H, W, C] float image.
        rng: the source of the white noise whose phase is used.

    Returns:
        float64 [H, W, C], not clipped.
    """
    image = np.asarray(image, np.float64)
    height, width = image.shape[:2]
    phase = np.angle(np.fft.fft2(rng.standard_normal((height, width))))
    phase[0, 0] = 0.0
    spectrum = np.fft.fft2(image, axes=(0, 1))
    scrambled = np.abs(spectrum) * np.exp(1j * phase)[:, :, None]
    return np.real(np.fft.ifft2(scrambled, axes=(0, 1)))


def make_stimulus(
    image: np.ndarray, importance: np.ndarray, level_percent: float, background: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Reveal the top `level_percent` of `image` by `importance`, centered on `background`.

    Args:
        image: [H, W, 3] photo.
        importance: [H, W] feature importance (higher is more important).
        level_percent: the share of pixels revealed, in (0, 100].
        background: [H, W, 3] background (see `phase_scrambled_background`).

    Returns:
        The float64 [H, W, 3] stimulus and the bool [H, W] mask of revealed pixels in it.

    Raises:
        ValueError: if the shapes differ.
    """
    height, width = importance.shape
    if image.shape[:2] != (height, width) or background.shape != image.shape:
        raise ValueError(
            f"image {image.shape}, importance {importance.shape} and background "
            f"{background.shape} must share height and width; resize them to one size first"
        )
    count = revealed_count(level_percent, height, width)
    chosen = reveal_order(importance)[:count]
    rows, columns = np.unravel_index(chosen, (height, width))

    # Shift the bounding box of the revealed pixels to the center of the frame.
    shift_rows = (height - 1 - rows.max() - rows.min()) // 2
    shift_columns = (width - 1 - columns.max() - columns.min()) // 2
    target_rows = rows + shift_rows
    target_columns = columns + shift_columns

    stimulus = np.array(background, np.float64, copy=True)
    stimulus[target_rows, target_columns] = image[rows, columns]
    mask = np.zeros((height, width), bool)
    mask[target_rows, target_columns] = True
    return stimulus, mask


def make_stimuli(
    images: np.ndarray,
    importance: np.ndarray,
    levels: Sequence[float] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Build every stimulus of a set of photos.

    Args:
        images: [N, H, W, 3] photos.
        importance: [N, H, W] importance maps.
        levels: percentages; `default_levels()` when None.
        seed: seed of the background noise (one background per photo, shared by its levels).

    Returns:
        float32 stimuli [L, N, H, W, 3] and bool masks [L, N, H, W].
    """
    levels = default_levels() if levels is None else np.asarray(levels, np.float64)
    images = np.asarray(images, np.float64)
    importance = np.asarray(importance, np.float64)
    if images.shape[:3] != importance.shape:
        raise ValueError(
            f"images {images.shape} and importance maps {importance.shape} must have the same "
            "count, height and width"
        )
    rng = np.random.default_rng(seed)
    stimuli = np.zeros((len(levels),) + images.shape, np.float32)
    masks = np.zeros((len(levels),) + importance.shape, bool)
    for index, (image, importance_map) in enumerate(zip(images, importance, strict=True)):
        background = phase_scrambled_background(image, rng)
        for level_index, level in enumerate(levels):
            stimulus, mask = make_stimulus(image, importance_map, level, background)
            stimuli[level_index, index] = stimulus
            masks[level_index, index] = mask
    return stimuli, masks


def is_animal_class(classes: np.ndarray) -> np.ndarray:
    """Return True for ImageNet classes 0-397 (animals)."""
    classes = np.asarray(classes)
    return (classes >= 0) & (classes < NUM_ANIMAL_CLASSES)


def decisions(
    logits_fn: Callable[[tf.Tensor], tf.Tensor],
    stimuli: np.ndarray,
    image_size: int | None,
    batch_size: int = 32,
) -> np.ndarray:
    """Return the model's animal decisions, bool [L, N], for stimuli [L, N, H, W, 3].

    Stimuli are resized bilinearly to `image_size` when the model needs another size.
    """
    levels, count = stimuli.shape[:2]
    flat = stimuli.reshape((levels * count,) + stimuli.shape[2:])
    results = []
    for start in range(0, len(flat), batch_size):
        batch = tf.convert_to_tensor(flat[start : start + batch_size], tf.float32)
        if image_size is not None and batch.shape[1] != image_size:
            batch = tf.image.resize(batch, [image_size, image_size])
        top1 = np.argmax(np.asarray(logits_fn(batch)), axis=-1)
        results.append(is_animal_class(top1))
    return np.concatenate(results).reshape(levels, count)


def normalize_curve(accuracy: np.ndarray) -> tuple[np.ndarray, bool]:
    """Min-max normalize an accuracy curve along its last axis.

    Returns:
        The normalized curve and whether it was flat (then it is all zeros).
    """
    accuracy = np.asarray(accuracy, np.float64)
    low = accuracy.min(axis=-1, keepdims=True)
    span = accuracy.max(axis=-1, keepdims=True) - low
    flat = span == 0
    normalized = np.where(flat, 0.0, (accuracy - low) / np.where(flat, 1.0, span))
    return normalized, bool(np.all(flat))


def read_human_curve(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a human decision curve CSV with `level` (percent) and `accuracy` columns.

    Raises:
        ValueError: for missing columns, fewer than two rows, or values out of range.
    """
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if not {"level", "accuracy"} <= set(reader.fieldnames or []):
            raise ValueError(
                f"human curve {path!r} needs 'level' and 'accuracy' columns, got "
                f"{reader.fieldnames}"
            )
        rows = [(float(row["level"]), float(row["accuracy"])) for row in reader]
    if len(rows) < 2:
        raise ValueError(f"human curve {path!r} needs at least 2 levels, got {len(rows)}")
    rows.sort()
    levels = np.array([level for level, _ in rows])
    accuracy = np.array([value for _, value in rows])
    if levels.min() <= 0 or not np.all((accuracy >= 0) & (accuracy <= 1)):
        raise ValueError(
            f"human curve {path!r}: levels must be > 0 (percent) and accuracies in [0, 1]"
        )
    return levels, accuracy


def curve_distance(
    levels: np.ndarray,
    model_curve: np.ndarray,
    human_levels: np.ndarray,
    human_curve: np.ndarray,
) -> np.ndarray:
    """Return the L2 distance between normalized model curves and the normalized human curve.

    Args:
        levels: [L] model levels in percent.
        model_curve: [..., L] normalized model curves.
        human_levels: [M] human levels in percent.
        human_curve: [M] normalized human curve.

    Raises:
        ValueError: if the model levels fall outside the human levels' range.
    """
    if levels.min() < human_levels.min() or levels.max() > human_levels.max():
        raise ValueError(
            f"model levels {levels.min():g}-{levels.max():g}% exceed the human curve's range "
            f"{human_levels.min():g}-{human_levels.max():g}%; give the model the human levels"
        )
    human_at_levels = np.interp(np.log10(levels), np.log10(human_levels), human_curve)
    return np.sqrt(np.sum(np.square(model_curve - human_at_levels), axis=-1))


def psychophysics_report(
    correct: np.ndarray,
    levels: np.ndarray,
    human_curve: tuple[np.ndarray, np.ndarray] | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Summarize per-level correctness: accuracy, normalized curve, distance to humans.

    Args:
        correct: bool [L, N], whether the decision on image n at level l was right.
        levels: [L] levels in percent.
        human_curve: `(levels, accuracy)` from `read_human_curve`, or None.
        resamples: bootstrap resamples over images for the distance's deviation.
        seed: bootstrap seed.
    """
    accuracy = correct.mean(axis=1)
    normalized, flat = normalize_curve(accuracy)
    report: dict[str, Any] = {
        "levels_percent": levels.tolist(),
        "accuracy": accuracy.tolist(),
        "normalized_accuracy": normalized.tolist(),
        "normalization": "min-max of the accuracy curve",
        "flat_curve": flat,
        "images": int(correct.shape[1]),
        "human_data": "none ships with harmonizer; pass a CSV of level,accuracy",
    }
    if human_curve is None:
        return report
    human_levels, human_accuracy = human_curve
    human_normalized, _ = normalize_curve(human_accuracy)
    distance = float(curve_distance(levels, normalized, human_levels, human_normalized))
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, correct.shape[1], size=(resamples, correct.shape[1]))
    resampled = correct[:, indices].mean(axis=2).T
    resampled_normalized, _ = normalize_curve(resampled)
    distances = curve_distance(levels, resampled_normalized, human_levels, human_normalized)
    report["human_data"] = "user-supplied CSV"
    report["human_normalized_accuracy"] = np.interp(
        np.log10(levels), np.log10(human_levels), human_normalized
    ).tolist()
    report["l2_distance_to_humans"] = {
        "value": distance,
        "bootstrap_std": float(distances.std()),
        "resamples": resamples,
    }
    return report
