"""Benchmark the batched map metrics and their share of a whole ResNet50 evaluation.

Run by hand (not a test):

    python -m benchmarks.bench_metrics                  # both parts, about 3 min on 2 cores
    python -m benchmarks.bench_metrics --part=metrics --num_maps=2000

Part `metrics` scores the same maps of 224x224 three ways and checks that they agree:

* a per-image loop with scipy: `spearmanr` plus Dice and IoU from `rankdata` (the same tie
  rule as `harmonizer.metrics`);
* `harmonizer.metrics.map_scores` per batch, eagerly;
* the same inside `tf.function`, which ranks each map once for all three metrics.

Part `evaluation` times a randomly initialized Keras ResNet50 at 224x224: its saliency alone
(one `tf.function` per batch) against `harmonizer.evaluation.scoring.evaluate_maps`, which
adds the metrics of each batch alongside the next batch's saliency. It prints the ratio.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from harmonizer import metrics  # noqa: E402
from harmonizer import saliency as hsaliency  # noqa: E402
from harmonizer.evaluation import models, scoring  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "all", ["all", "metrics", "evaluation"], "Which benchmark to run.")
flags.DEFINE_integer("num_maps", 2000, "Maps scored in the metrics part.")
flags.DEFINE_integer("map_size", 224, "Side of the maps in pixels.")
flags.DEFINE_integer("batch_size", 50, "Maps per batch in the metrics part.")
flags.DEFINE_integer("num_images", 64, "Images scored in the evaluation part.")
flags.DEFINE_integer("eval_batch_size", 16, "Images per batch in the evaluation part.")
flags.DEFINE_integer("seed", 0, "Seed of the random maps and images.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions of each evaluation run (best is kept).")

# Human maps are 8-bit images, so they are quantized to 256 levels (many ties).
HUMAN_MAP_LEVELS = 256


def make_maps(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return float32 saliency-like maps and 8-bit human-like maps correlated with them."""
    rng = np.random.default_rng(seed)
    saliency = rng.normal(size=(count, size, size)).astype(np.float32)
    smooth = rng.normal(size=(count, size // 8, size // 8))
    smooth = np.kron(smooth, np.ones((8, 8)))[:, :size, :size] + 0.2 * saliency
    low, high = smooth.min(), smooth.max()
    human = np.round((smooth - low) / (high - low) * (HUMAN_MAP_LEVELS - 1)).astype(np.float32)
    return saliency, human


def _scipy_membership(values: np.ndarray, fraction: float) -> np.ndarray:
    size = values.size
    first = scipy.stats.rankdata(values, method="min")
    last = scipy.stats.rankdata(values, method="max")
    count = last - first + 1
    return np.clip(last - (size - fraction * size), 0, count) / count


def scipy_loop(saliency: np.ndarray, human: np.ndarray, fraction: float) -> np.ndarray:
    """Return [N, 3] Spearman, Dice and IoU computed one image at a time with scipy."""
    results = np.zeros((len(saliency), 3))
    for index, (a, b) in enumerate(zip(saliency, human, strict=True)):
        a, b = a.ravel(), b.ravel()
        rho = scipy.stats.spearmanr(a, b).statistic
        intersection = np.minimum(_scipy_membership(a, fraction), _scipy_membership(b, fraction))
        selected = fraction * a.size
        common = intersection.sum()
        results[index] = (rho, common / selected, common / (2 * selected - common))
    return results


def batched(function, saliency: np.ndarray, human: np.ndarray, batch_size: int) -> np.ndarray:
    """Return [N, 3] scores computed by `function` one batch at a time."""
    parts = []
    for start in range(0, len(saliency), batch_size):
        scores = function(
            tf.constant(saliency[start : start + batch_size]),
            tf.constant(human[start : start + batch_size]),
        )
        parts.append(np.stack([scores.spearman, scores.dice, scores.iou], axis=1))
    return np.concatenate(parts)


def _timed(function, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def bench_metrics() -> None:
    fraction = metrics.DEFAULT_TOP_FRACTION
    saliency, human = make_maps(FLAGS.num_maps, FLAGS.map_size, FLAGS.seed)
    compiled = tf.function(metrics.map_scores, reduce_retracing=True)
    # Trace and warm up on one batch so that tracing is not timed.
    batched(compiled, saliency[: FLAGS.batch_size], human[: FLAGS.batch_size], FLAGS.batch_size)

    loop_seconds, reference = _timed(scipy_loop, saliency, human, fraction)
    eager_seconds, eager = _timed(batched, metrics.map_scores, saliency, human, FLAGS.batch_size)
    graph_seconds, graph = _timed(batched, compiled, saliency, human, FLAGS.batch_size)

    print(
        f"maps: {FLAGS.num_maps} of {FLAGS.map_size}x{FLAGS.map_size}, CPU cores: {os.cpu_count()}"
    )
    print(f"scipy per-image loop (rho, Dice, IoU): {loop_seconds:8.2f} s")
    print(f"map_scores eager, batch {FLAGS.batch_size}:          {eager_seconds:8.2f} s")
    print(f"map_scores tf.function, batch {FLAGS.batch_size}:    {graph_seconds:8.2f} s")
    print(f"speed-up of tf.function over scipy: {loop_seconds / graph_seconds:.2f}x")
    for name, column in (("spearman", 0), ("dice", 1), ("iou", 2)):
        difference = np.abs(graph[:, column] - reference[:, column]).max()
        eager_difference = np.abs(eager[:, column] - reference[:, column]).max()
        print(f"max |{name} - scipy|: graph {difference:.2e}, eager {eager_difference:.2e}")


def bench_evaluation() -> None:
    size, count, batch_size = FLAGS.map_size, FLAGS.num_images, FLAGS.eval_batch_size
    keras.utils.set_random_seed(FLAGS.seed)
    backbone = keras.applications.ResNet50(
        weights=None, input_shape=(size, size, 3), classifier_activation=None
    )
    model = models.LoadedModel(
        "resnet50", "keras", "none", "given", size, backbone, keras_model=backbone
    )
    rng = np.random.default_rng(FLAGS.seed)
    images = rng.uniform(0, 255, size=(count, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 1000, size=count).astype(np.int32)
    _, human = make_maps(count, size, FLAGS.seed)
    dataset = tf.data.Dataset.from_tensor_slices(
        {
            "image": images,
            "map": human,
            "has_map": np.ones(count, bool),
            "label": labels,
            "id": np.array([str(i) for i in range(count)]),
        }
    ).batch(batch_size)

    @tf.function(reduce_retracing=True)
    def saliency_only(batch_images, batch_labels):
        return hsaliency.saliency_maps(backbone, batch_images, batch_labels)

    def run_saliency_only():
        for batch in dataset:
            saliency_only(batch["image"], batch["label"]).numpy()

    def run_evaluation():
        return scoring.evaluate_maps(model, dataset, progress=False)

    run_saliency_only()  # Warm up: trace and allocate.
    run_evaluation()
    # Interleave the two runs and keep the fastest of each, so that load from other processes
    # on a shared machine inflates both alike and disturbs the minimum least.
    saliency_times, evaluation_times = [], []
    for _ in range(FLAGS.repeats):
        saliency_times.append(_timed(run_saliency_only)[0])
        seconds, evaluation = _timed(run_evaluation)
        evaluation_times.append(seconds)
    saliency_seconds, evaluation_seconds = min(saliency_times), min(evaluation_times)
    print(f"ResNet50 {size}x{size}, {count} images, batch {batch_size}, cores: {os.cpu_count()}")
    print(f"saliency alone, best of {FLAGS.repeats}:                 {saliency_seconds:8.2f} s")
    print(f"evaluate_maps (saliency+metrics), best of {FLAGS.repeats}: {evaluation_seconds:8.2f} s")
    print(f"overhead of the metrics: {100 * (evaluation_seconds / saliency_seconds - 1):.1f}%")
    print(f"scored: {evaluation.counts['scored']} of {evaluation.counts['examples']}")


def main(argv):
    del argv
    if FLAGS.part in ("all", "metrics"):
        bench_metrics()
    if FLAGS.part in ("all", "evaluation"):
        bench_evaluation()


if __name__ == "__main__":
    app.run(main)
