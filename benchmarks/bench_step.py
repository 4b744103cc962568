"""Benchmark a harmonized training step against a plain one on the same model and batch.

Run by hand (not a test):

    python -m benchmarks.bench_step --model=resnet50 --image_size=224 --batch_size=8
    python -m benchmarks.bench_step --model=small_cnn --image_size=64 --batch_size=32

Three `Harmonizer` steps run on one fixed batch, interleaved round by round so that load from
other processes hits every variant alike:

* ``plain``: cross-entropy and weight decay only (``harmonization_weight=0``);
* ``full``: the harmonized step with the second-order saliency pass on the whole batch
  (``saliency_subbatch=0``), whose cost does not depend on how many examples have a map;
* ``sub``: the harmonized step with ``saliency_subbatch=k`` for each k of ``--subbatch``.

The cost of a step depends on the static k, not on the mapped count, so the coverage enters
only through the choice of k. For each coverage of ``--coverage`` the script prints the k that
covers 99% of the mapped examples in expectation when each example has a map with that
probability (binomial), and the expected share of mapped examples that each k covers.

Each step is timed twice: wall-clock time, and the CPU time of this process (all of its
threads, `time.process_time`). On a machine shared with other jobs, wall-clock time includes
waiting for a core, and CPU time does not, so the CPU-time ratio is the one to compare. Each
ratio is the median over rounds of (variant time / plain time in the same round); the medians
of the times are printed too.
"""

from __future__ import annotations

import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from harmonizer import zoo  # noqa: E402
from harmonizer.model import Harmonizer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet50", "Model name from harmonizer.zoo.")
flags.DEFINE_integer("image_size", 224, "Side of the square input, in pixels.")
flags.DEFINE_integer("batch_size", 8, "Examples per step.")
flags.DEFINE_integer("num_classes", 1000, "Output classes.")
flags.DEFINE_list("subbatch", ["2"], "Values of saliency_subbatch to time; empty: none.")
flags.DEFINE_list("coverage", ["1.0", "0.15"], "Shares of examples with a map to report on.")
flags.DEFINE_integer("rounds", 5, "Timed rounds; each runs every variant once.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per variant before timing (tracing included).")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the batch.")

# Share of mapped examples the recommended k must cover in expectation.
TARGET_COVERAGE = 0.99


def fixed_batch(batch_size: int, image_size: int, num_classes: int, seed: int):
    """Random images, blob-shaped maps and labels; every example has a map."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    centers = rng.uniform(0.2, 0.8, (batch_size, 2))
    maps = np.exp(
        -((yy - centers[:, :1, None]) ** 2 + (xx - centers[:, 1:, None]) ** 2) / 0.02
    ).astype(np.float32)
    features = {
        "image": tf.constant(images),
        "map": tf.constant(maps),
        "has_map": tf.ones([batch_size], tf.float32),
    }
    labels = tf.constant(rng.integers(0, num_classes, batch_size), tf.int32)
    return features, labels


def build_variant(weight: float, subbatch: int, initial_weights) -> Harmonizer:
    backbone = zoo.build(FLAGS.model, num_classes=FLAGS.num_classes, image_size=FLAGS.image_size)
    backbone.set_weights(initial_weights)
    model = Harmonizer(backbone, harmonization_weight=weight, saliency_subbatch=subbatch)
    model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9))
    return model


def expected_coverage(batch_size: int, coverage: float, subbatch: int) -> float:
    """E[min(M, k)] / E[M] for M ~ Binomial(batch_size, coverage)."""
    counts = np.arange(batch_size + 1)
    probabilities = scipy.stats.binom.pmf(counts, batch_size, coverage)
    mean = float(np.sum(counts * probabilities))
    return float(np.sum(np.minimum(counts, subbatch) * probabilities)) / mean


def recommended_subbatch(batch_size: int, coverage: float) -> int:
    for subbatch in range(1, batch_size + 1):
        if expected_coverage(batch_size, coverage, subbatch) >= TARGET_COVERAGE:
            return subbatch
    return batch_size


def main(argv):
    del argv
    keras.utils.set_random_seed(FLAGS.seed)
    reference = zoo.build(FLAGS.model, num_classes=FLAGS.num_classes, image_size=FLAGS.image_size)
    initial_weights = reference.get_weights()
    variants = {"plain": (0.0, 0), "full": (1.0, 0)}
    for text in FLAGS.subbatch:
        variants[f"sub k={int(text)}"] = (1.0, int(text))
    models = {name: build_variant(*spec, initial_weights) for name, spec in variants.items()}
    features, labels = fixed_batch(
        FLAGS.batch_size, FLAGS.image_size, FLAGS.num_classes, FLAGS.seed
    )

    print(
        f"{FLAGS.model} {FLAGS.image_size}px batch {FLAGS.batch_size}; TF {tf.__version__}, "
        f"Keras {keras.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
    )
    for name, model in models.items():
        start = time.perf_counter()
        for _ in range(FLAGS.warmup):
            model.train_on_batch(features, labels)
        print(f"warm-up {name}: {time.perf_counter() - start:.1f} s")

    wall = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for _ in range(FLAGS.rounds):
        for name, model in models.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            model.train_on_batch(features, labels)
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)

    print(f"\n{'variant':<10} {'wall s':>8} {'ratio':>7} {'CPU s':>8} {'ratio':>7}")
    for name in models:
        wall_ratio = float(np.median(np.array(wall[name]) / np.array(wall["plain"])))
        cpu_ratio = float(np.median(np.array(cpu[name]) / np.array(cpu["plain"])))
        print(
            f"{name:<10} {np.median(wall[name]):>8.3f} {wall_ratio:>6.2f}x "
            f"{np.median(cpu[name]):>8.3f} {cpu_ratio:>6.2f}x"
        )
    print(f"load average {os.getloadavg()[0]:.1f} at end")

    print("\ncoverage  k for 99%  expected share of mapped examples covered by each k")
    for text in FLAGS.coverage:
        coverage = float(text)
        recommended = recommended_subbatch(FLAGS.batch_size, coverage)
        shares = ", ".join(
            f"k={int(k)}: {expected_coverage(FLAGS.batch_size, coverage, int(k)):.3f}"
            for k in FLAGS.subbatch
        )
        print(f"{coverage:>8.2f}  {recommended:>9d}  {shares}")


if __name__ == "__main__":
    app.run(main)
