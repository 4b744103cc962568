"""Train a baseline and harmonized models on the shortcut task and score them.

Every variant is trained identically (same data, initial weights, batch order, optimizer and
number of steps for a given seed); only the loss differs:

* ``baseline``: cross-entropy only.
* ``paper``: cross-entropy plus the harmonization term of Fel et al. (NeurIPS 2022) on the
  signed saliency.
* ``abs``: cross-entropy plus the same term on the absolute saliency
  (`harmonizer.model.Harmonizer` with ``saliency_definition="abs_max"``).

Each model is scored on the unbiased test split (the corner patch is independent of the label)
for top-1 and for alignment with the object masks under both saliency definitions and both
BatchNorm modes (`harmonizer.alignment`). The recipe's network has no BatchNorm, so the two
modes give the same saliency by construction; they are still both computed, as a check.
``BenchmarkConfig.batch_norm`` adds BatchNorm to show the gap the modes can have.
"""

from __future__ import annotations

import dataclasses
import time

import keras
import numpy as np
import tensorflow as tf

from harmonizer import alignment, saliency, shortcut
from harmonizer import layers as hlayers
from harmonizer.model import Harmonizer

VARIANTS = {
    "baseline": (0.0, saliency.SIGNED_MEAN),
    "paper": (None, saliency.SIGNED_MEAN),
    "abs": (None, saliency.ABS_MAX),
}
TINY_CNN_LAYERS = ((16, 1), (32, 2), (64, 2), (64, 1))  # (filters, stride) of 3x3 convs
TRAIN_SEED_OFFSET = 1000
TEST_SEED_OFFSET = 2000


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """Sizes and training recipe of one benchmark run (defaults: the full benchmark)."""

    task: shortcut.ShortcutConfig = dataclasses.field(
        default_factory=lambda: shortcut.ShortcutConfig(
            image_size=32, num_classes=4, object_size_range=(12, 16), clutter_count=4
        )
    )
    num_train: int = 2000
    num_test: int = 1000
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 3e-3
    harmonization_weight: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = ("baseline", "paper", "abs")
    # Map coverage of the sweep, run for `sweep_variant`; coverage 1.0 is the main run.
    sweep_fractions: tuple[float, ...] = (0.3, 0.1)
    sweep_variant: str = "abs"
    # Off in the recipe; on, it shows the training-mode vs inference-mode saliency gap.
    batch_norm: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        self.task.validate()
        unknown = [v for v in (*self.variants, self.sweep_variant) if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants must be among {tuple(VARIANTS)}, got {unknown}")
        if min(self.num_train, self.num_test, self.steps, self.batch_size) < 1:
            raise ValueError("num_train, num_test, steps and batch_size must all be >= 1")
        if self.batch_size > self.num_train:
            raise ValueError(
                f"batch_size {self.batch_size} exceeds num_train {self.num_train}; "
                "training batches have a fixed size"
            )
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if any(not 0.0 < f <= 1.0 for f in self.sweep_fractions):
            raise ValueError(f"sweep_fractions must be in (0, 1], got {self.sweep_fractions}")


def build_tiny_cnn(num_classes: int, image_size: int, batch_norm: bool = False) -> keras.Model:
    """Build a 4-layer ReLU CNN: RGB in [0, 255] to logits.

    Args:
        num_classes: number of logits.
        image_size: side of the square input.
        batch_norm: add `harmonizer.layers.ExactBatchNormalization` after each convolution.
            The benchmark's recipe has none, so the training-mode and inference-mode saliency
            are the same function; with it, they can differ.
    """
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocessing")(inputs)
    for index, (filters, stride) in enumerate(TINY_CNN_LAYERS):
        x = keras.layers.Conv2D(
            filters, 3, strides=stride, padding="same", use_bias=not batch_norm, name=f"conv{index}"
        )(x)
        if batch_norm:
            x = hlayers.ExactBatchNormalization(name=f"bn{index}")(x)
        x = keras.layers.ReLU(name=f"relu{index}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="tiny_cnn")


def _training_dataset(
    split: shortcut.ShortcutSplit, has_map: np.ndarray, batch_size: int, seed: int
) -> tf.data.Dataset:
    features = {
        "image": split.images.astype(np.float32),
        "map": split.maps,
        "has_map": has_map.astype(np.float32),
    }
    dataset = tf.data.Dataset.from_tensor_slices((features, split.labels))
    dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    return dataset.repeat().batch(batch_size, drop_remainder=True)


def train_variant(
    variant: str,
    train: shortcut.ShortcutSplit,
    has_map: np.ndarray,
    config: BenchmarkConfig,
    seed: int,
) -> keras.Model:
    """Train one variant from the initial weights of ``seed``; return its backbone."""
    weight, definition = VARIANTS[variant]
    if weight is None:
        weight = config.harmonization_weight
    keras.utils.set_random_seed(seed)
    backbone = build_tiny_cnn(config.task.num_classes, config.task.image_size, config.batch_norm)
    model = Harmonizer(backbone, saliency_definition=definition, harmonization_weight=weight)
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    dataset = _training_dataset(train, has_map, config.batch_size, seed)
    model.fit(dataset, steps_per_epoch=config.steps, epochs=1, verbose=0)
    return backbone


def generate_data(
    config: BenchmarkConfig, seed: int
) -> tuple[shortcut.ShortcutSplit, shortcut.ShortcutSplit]:
    """Return the (biased train, unbiased test) splits of ``seed``."""
    train = shortcut.generate_split(
        config.task, config.num_train, biased=True, seed=TRAIN_SEED_OFFSET + seed
    )
    test = shortcut.generate_split(
        config.task, config.num_test, biased=False, seed=TEST_SEED_OFFSET + seed
    )
    return train, test


def run_benchmark(config: BenchmarkConfig, log=print) -> tuple[list[dict], dict]:
    """Run every variant and the coverage sweep over every seed.

    Returns:
        ``(rows, models)``: one row per (variant, coverage, seed) with the test accuracy, the
        four alignments and the training seconds; and the trained backbones of the first seed
        keyed by ``(variant, coverage)``, for figures.
    """
    config.validate()
    runs = [(variant, 1.0) for variant in config.variants]
    runs += [(config.sweep_variant, fraction) for fraction in config.sweep_fractions]
    rows, models = [], {}
    for seed in config.seeds:
        train, test = generate_data(config, seed)
        for variant, coverage in runs:
            has_map = shortcut.map_coverage_flags(len(train), coverage, seed)
            start = time.perf_counter()
            backbone = train_variant(variant, train, has_map, config, seed)
            seconds = time.perf_counter() - start
            scores = alignment.score_saliency(backbone, test.images, test.labels, test.maps)
            row = {"variant": variant, "coverage": coverage, "seed": seed}
            row.update(scores.as_row())
            row["train_seconds"] = seconds
            rows.append(row)
            log(
                f"seed {seed} {variant:8s} coverage {coverage:.0%}: test top-1 "
                f"{row['accuracy']:.3f}, alignment abs {row['abs_max/inference']:+.3f} "
                f"signed {row['signed_mean/inference']:+.3f} ({seconds:.0f} s)"
            )
            if seed == config.seeds[0]:
                models[(variant, coverage)] = backbone
    return rows, models


def summarize(rows: list[dict]) -> list[dict]:
    """Average the rows over seeds: mean and sample standard deviation of every metric."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["coverage"]), []).append(row)
    summary = []
    for (variant, coverage), group in groups.items():
        entry = {"variant": variant, "coverage": coverage, "num_seeds": len(group)}
        for key in group[0]:
            if key in ("variant", "coverage", "seed"):
                continue
            values = np.array([row[key] for row in group], np.float64)
            entry[key] = float(values.mean())
            entry[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def markdown_table(summary: list[dict]) -> str:
    """Format `summarize` output as a Markdown table (mean ± sample std over seeds)."""
    columns = [
        ("accuracy", "test top-1"),
        ("abs_max/inference", "align. abs (inf.)"),
        ("signed_mean/inference", "align. signed (inf.)"),
        ("abs_max/training", "align. abs (train)"),
        ("signed_mean/training", "align. signed (train)"),
    ]
    header = "| variant | maps | seeds | " + " | ".join(title for _, title in columns) + " |"
    lines = [header, "|" + "---|" * (3 + len(columns))]
    for entry in summary:
        cells = [entry["variant"], f"{entry['coverage']:.0%}", str(entry["num_seeds"])]
        cells += [f"{entry[key]:.3f} ± {entry[key + '_std']:.3f}" for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
