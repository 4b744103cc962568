"""Score a trained model's accuracy and alignment with the maps of a set of TFRecords.

Example:

    python -m experiments.evaluate --model_path=runs/tiny/harmonized/export \
        --data_pattern='runs/tiny/records/val-*' --output=runs/tiny/harmonized/eval.json

Alignment is the per-image Spearman correlation between the model's saliency and the map,
divided by the human inter-rater ceiling of ClickMe, averaged over every example that has a
map. It is reported for both saliency definitions (``signed_mean`` as trained, ``abs_max`` as
explainability libraries compute it), beside trivial maps that need no model: darkness
(255 minus the gray level), a centered Gaussian, and the leave-one-out mean map of the set.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from harmonizer import data, export, metrics, saliency

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model_path", None, "Export directory, .keras file or SavedModel directory.", required=True
)
flags.DEFINE_string("data_pattern", None, "Glob of the TFRecord shards to score.", required=True)
flags.DEFINE_integer("batch_size", 32, "Evaluation batch size (the last partial batch is scored).")
flags.DEFINE_integer("image_size", 0, "Input side in pixels; 0 reads it from the model.")
flags.DEFINE_string("output", None, "Path of the JSON report; default: print only.")

# Standard deviation of the centered-Gaussian baseline, as a fraction of the image side.
CENTER_GAUSSIAN_SIGMA = 0.25
BASELINE_MAPS = ("darkness", "center_gaussian", "mean_map")


def load_model(path: str):
    """Load an export directory or `.keras` file with Keras, or a SavedModel via TFSMLayer."""
    if path.endswith(".keras") or tf.io.gfile.exists(os.path.join(path, export.KERAS_FILE)):
        return export.load_keras(path)
    return export.load_saved_model(path)


def center_gaussian(size: int) -> np.ndarray:
    """Return a [size, size] Gaussian bump centered in the image."""
    coordinates = (np.arange(size) - (size - 1) / 2.0) / size
    yy, xx = np.meshgrid(coordinates, coordinates, indexing="ij")
    return np.exp(-(yy**2 + xx**2) / (2 * CENTER_GAUSSIAN_SIGMA**2)).astype(np.float32)


def _map_sum(dataset: tf.data.Dataset) -> tuple[np.ndarray, int]:
    total, count = None, 0
    for features, _ in dataset:
        weighted = features["map"] * features["has_map"][:, None, None]
        batch_sum = tf.reduce_sum(weighted, axis=0).numpy()
        total = batch_sum if total is None else total + batch_sum
        count += int(tf.reduce_sum(features["has_map"]))
    return total, count


class _Accumulator:
    """Sum of Spearman correlations over the examples that have a map and a non-constant map."""

    def __init__(self):
        self.values: list[np.ndarray] = []
        self.constant = 0

    def add(self, rho: tf.Tensor, valid: tf.Tensor, has_map: tf.Tensor) -> None:
        mapped = has_map.numpy() > 0
        valid = valid.numpy()
        self.values.append(rho.numpy()[mapped & valid])
        self.constant += int(np.sum(mapped & ~valid))

    def summary(self) -> dict:
        values = np.concatenate(self.values) if self.values else np.zeros([0])
        mean = float(values.mean()) if values.size else float("nan")
        return {
            "spearman": mean,
            "alignment": mean / metrics.HUMAN_CEILING_CLICKME,
            "examples_scored": int(values.size),
            "constant_maps": self.constant,
        }


def score_model(model, data_pattern: str, image_size: int, batch_size: int = 32) -> dict:
    """Return top-1, alignment under both saliency definitions, and the trivial baselines."""
    pipeline = data.PipelineConfig(
        file_pattern=data_pattern, batch_size=batch_size, image_size=image_size, training=False
    )
    dataset = data.build_dataset(pipeline)
    map_total, map_count = _map_sum(dataset)
    gaussian = tf.constant(center_gaussian(image_size))

    @tf.function
    def batch_saliency(images, labels):
        gradients, logits = saliency.input_gradients(model, images, labels, training=False)
        return (
            saliency.reduce_saliency(gradients, saliency.SIGNED_MEAN),
            saliency.reduce_saliency(gradients, saliency.ABS_MAX),
            logits,
        )

    scores = {name: _Accumulator() for name in (saliency.SIGNED_MEAN, saliency.ABS_MAX)}
    baselines = {name: _Accumulator() for name in BASELINE_MAPS}
    correct, examples = 0, 0
    for features, labels in dataset:
        signed, absolute, logits = batch_saliency(features["image"], labels)
        maps, has_map = features["map"], features["has_map"]
        correct += int(tf.reduce_sum(tf.cast(tf.argmax(logits, -1, tf.int32) == labels, tf.int32)))
        examples += int(labels.shape[0])
        scores[saliency.SIGNED_MEAN].add(*metrics.spearman(signed, maps), has_map)
        scores[saliency.ABS_MAX].add(*metrics.spearman(absolute, maps), has_map)

        # Trivial maps: the mean map leaves the scored example out of the average.
        darkness = 255.0 - tf.reduce_mean(features["image"], axis=-1)
        center = tf.broadcast_to(gaussian, tf.shape(maps))
        others = (map_total[None] - maps) / max(map_count - 1, 1)
        baselines["darkness"].add(*metrics.spearman(darkness, maps), has_map)
        baselines["center_gaussian"].add(*metrics.spearman(center, maps), has_map)
        baselines["mean_map"].add(*metrics.spearman(others, maps), has_map)

    signed_summary = scores[saliency.SIGNED_MEAN].summary()
    abs_summary = scores[saliency.ABS_MAX].summary()
    return {
        "data": data_pattern,
        "examples": examples,
        "top1": correct / max(examples, 1),
        "alignment": signed_summary["alignment"],
        "alignment_abs": abs_summary["alignment"],
        "examples_scored": signed_summary["examples_scored"],
        "ceiling": metrics.HUMAN_CEILING_CLICKME,
        "saliency": {
            saliency.SIGNED_MEAN: signed_summary,
            saliency.ABS_MAX: abs_summary,
        },
        "baselines": {name: acc.summary() for name, acc in baselines.items()},
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    model = load_model(FLAGS.model_path)
    image_size = FLAGS.image_size or int(model.input_shape[1])
    report = score_model(model, FLAGS.data_pattern, image_size, FLAGS.batch_size)
    report["model"] = FLAGS.model_path
    text = json.dumps(report, indent=2)
    if FLAGS.output:
        with tf.io.gfile.GFile(FLAGS.output, "w") as f:
            f.write(text)
        logging.info("wrote %s", FLAGS.output)
    print(text)


if __name__ == "__main__":
    app.run(main)
