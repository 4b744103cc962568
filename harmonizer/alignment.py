"""Score a classifier's saliency against object maps under both definitions and both modes.

Every result of the CPU benchmarks reports four alignments: saliency ``signed_mean`` (what the
paper's loss trains) and ``abs_max`` (the absolute gradient of the original evaluation), each in
inference mode (BatchNorm with its moving averages, as users get the model) and in training
mode (BatchNorm with batch statistics, as the training loss sees it). Alignment is Spearman's
rho divided by the ClickMe human ceiling, averaged over the examples where rho is defined.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from harmonizer import metrics, saliency

MODES = {"inference": False, "training": True}


@dataclasses.dataclass(frozen=True)
class SaliencyScores:
    """Accuracy and alignment of one model on one set of images.

    Attributes:
        accuracy: top-1 in inference mode.
        alignment: ``{(definition, mode): mean alignment}`` over the valid examples.
        per_example: ``{(definition, mode): float32 [N] alignment}``, NaN where undefined.
        num_invalid: ``{(definition, mode): count of examples with an undefined rho}``.
    """

    accuracy: float
    alignment: dict[tuple[str, str], float]
    per_example: dict[tuple[str, str], np.ndarray]
    num_invalid: dict[tuple[str, str], int]

    def as_row(self) -> dict[str, float]:
        """Flatten to ``{"accuracy": ..., "abs_max/inference": ..., ...}``."""
        row = {"accuracy": self.accuracy}
        row.update({f"{d}/{m}": v for (d, m), v in self.alignment.items()})
        return row


def _mean_of_defined(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def score_saliency(
    model: keras.Model,
    images: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray,
    batch_size: int = 64,
    modes: tuple[str, ...] = tuple(MODES),
) -> SaliencyScores:
    """Compute top-1 and saliency alignment of ``model`` on ``images`` against ``maps``.

    Args:
        model: raw RGB in [0, 255] to logits.
        images: [N, H, W, 3] RGB in [0, 255].
        labels: [N] integer classes; the saliency is the gradient of this class's logit.
        maps: [N, H, W] object or human maps.
        batch_size: examples per gradient computation. Training-mode BatchNorm uses the
            statistics of each batch, so training-mode scores depend on it.
        modes: a subset of `MODES`.

    Raises:
        ValueError: on mismatched lengths or shapes, or an unknown mode.
    """
    if not len(images) == len(labels) == len(maps):
        raise ValueError(
            f"images, labels and maps must have the same length, got {len(images)}, "
            f"{len(labels)} and {len(maps)}"
        )
    if tuple(images.shape[1:3]) != tuple(maps.shape[1:3]):
        raise ValueError(
            f"maps must match the images' size: images {images.shape}, maps {maps.shape}"
        )
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise ValueError(f"modes must be among {tuple(MODES)}, got {unknown}")

    correct = []
    per_example = {(d, m): [] for d in saliency.DEFINITIONS for m in modes}
    for start in range(0, len(images), batch_size):
        batch = tf.constant(images[start : start + batch_size], tf.float32)
        batch_labels = tf.constant(labels[start : start + batch_size], tf.int32)
        batch_maps = tf.constant(maps[start : start + batch_size], tf.float32)
        for mode in modes:
            gradients, logits = saliency.input_gradients(
                model, batch, batch_labels, training=MODES[mode]
            )
            if mode == "inference":
                correct.append(np.argmax(logits, axis=-1) == labels[start : start + batch_size])
            for definition in saliency.DEFINITIONS:
                reduced = saliency.reduce_saliency(gradients, definition)
                rho, valid = metrics.spearman(reduced, batch_maps)
                values = np.where(valid, rho.numpy() / metrics.HUMAN_CEILING_CLICKME, np.nan)
                per_example[(definition, mode)].append(values.astype(np.float32))

    per_example = {key: np.concatenate(values) for key, values in per_example.items()}
    accuracy = float(np.mean(np.concatenate(correct))) if correct else float("nan")
    alignment = {key: _mean_of_defined(values) for key, values in per_example.items()}
    num_invalid = {key: int(np.isnan(values).sum()) for key, values in per_example.items()}
    return SaliencyScores(accuracy, alignment, per_example, num_invalid)
