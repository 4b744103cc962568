"""The map evaluation loop: saliency, batched metrics, counts and bootstrap deviations.

For models that TensorFlow can trace, one `tf.function` step computes the saliency of batch
i + 1 and the metrics of batch i together. The two have no data dependency, so TensorFlow runs
them concurrently on the CPU's inter-op threads, or queues both on an accelerator without a
round trip to the host in between.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from harmonizer import metrics
from harmonizer import saliency as hsaliency
from harmonizer.evaluation.models import LoadedModel

TARGET_LABEL = "label"
TARGET_PREDICTED = "predicted"
TARGETS = (TARGET_LABEL, TARGET_PREDICTED)
DEFAULT_BOOTSTRAP_RESAMPLES = 1000
# Standard deviation of the centered-Gaussian baseline map, as a fraction of the image side.
CENTER_GAUSSIAN_SIGMA = 0.25
BASELINES = ("mean_map", "center_gaussian", "darkness")


@dataclasses.dataclass
class MapEvaluation:
    """Per-example scores and counts of one evaluation.

    Attributes:
        ids: identifiers of the scored examples, in data order.
        spearman: float64 [n] Spearman's rho of each scored example.
        dice: float64 [n] Dice coefficients of the top-fraction pixels.
        iou: float64 [n] IoU of the top-fraction pixels.
        correct: bool [m] top-1 correctness of the examples with a known label.
        counts: examples seen, scored, and left out by reason.
        map_sum: float64 [S, S] sum of the human maps of the scored examples.
        map_count: how many maps `map_sum` adds up.
    """

    ids: list[str]
    spearman: np.ndarray
    dice: np.ndarray
    iou: np.ndarray
    correct: np.ndarray
    counts: dict[str, int]
    map_sum: np.ndarray | None
    map_count: int


def _target_classes(logits: tf.Tensor, labels: tf.Tensor, target: str) -> tf.Tensor:
    """Return the class whose logit is explained: the label, or the prediction if unknown."""
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    if target == TARGET_PREDICTED:
        return predicted
    return tf.where(labels >= 0, labels, predicted)


def gradient_saliency(
    model: LoadedModel,
    images: tf.Tensor,
    labels: tf.Tensor,
    definitions: tuple[str, ...],
    target: str,
) -> tuple[tuple[tf.Tensor, ...], tf.Tensor]:
    """Return one saliency batch per definition (from one gradient) and the logits.

    The explained class is the label, or the predicted class where the label is -1 (unknown)
    or `target` is `predicted`.
    """
    with tf.GradientTape() as tape:
        tape.watch(images)
        logits = tf.cast(model.forward(images, training=False), tf.float32)
        classes = _target_classes(tf.stop_gradient(logits), labels, target)
        chosen = tf.reduce_sum(logits * tf.one_hot(classes, tf.shape(logits)[-1]))
    gradients = tape.gradient(chosen, images)
    maps = tuple(hsaliency.reduce_saliency(gradients, d) for d in definitions)
    return maps, logits


class _Scorer:
    """Runs saliency and metrics for one model, pipelined when the model can be traced."""

    def __init__(
        self, model: LoadedModel, definitions: tuple[str, ...], target: str, fraction: float
    ):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        for definition in definitions:
            if definition not in hsaliency.DEFINITIONS:
                raise ValueError(
                    f"saliency definition must be one of {hsaliency.DEFINITIONS}, "
                    f"got {definition!r}"
                )
        if not definitions:
            raise ValueError(f"give at least one saliency definition of {hsaliency.DEFINITIONS}")
        self.model = model
        self.definitions = definitions
        self.target = target
        self.fraction = fraction
        self.scores = tf.function(self._scores, reduce_retracing=True)
        if model.graph_friendly:
            self.saliency = tf.function(self._saliency, reduce_retracing=True)
            self.pipelined = tf.function(self._pipelined, reduce_retracing=True)

    def _saliency(self, images, labels):
        return gradient_saliency(self.model, images, labels, self.definitions, self.target)

    def _scores(self, saliencies, maps):
        for saliency in saliencies:
            if saliency.shape[1:] != maps.shape[1:]:
                raise ValueError(
                    f"saliency maps of model {self.model.name!r} have shape {saliency.shape} but "
                    f"the human maps {maps.shape}; make the explainer return maps at the input "
                    "image's resolution"
                )
        # The human maps are ranked once for every saliency definition.
        ranked_maps = metrics.rank_maps(maps)
        return tuple(
            metrics.scores_from_ranks(metrics.rank_maps(s), ranked_maps, self.fraction)
            for s in saliencies
        )

    def _pipelined(self, images, labels, previous_saliencies, previous_maps):
        saliencies, logits = self._saliency(images, labels)
        return saliencies, logits, self._scores(previous_saliencies, previous_maps)

    def eager_saliency(self, images, labels):
        """Return saliency per definition and logits for a user explainer (no tracing).

        The explainer is called once per batch. When it returns [B, H, W, C] gradients they are
        reduced per definition; [B, H, W] maps are used as they are for every definition.
        """
        logits = None
        if self.model.forward is not None:
            logits = self.model.logits(images)
        if self.target == TARGET_PREDICTED or bool(tf.reduce_any(labels < 0)):
            if logits is None:
                raise ValueError(
                    f"model {self.model.name!r} has no prediction function, so it cannot explain "
                    "the predicted class; give labels for every image or a predict function"
                )
            labels = _target_classes(logits, labels, self.target)
        raw = tf.convert_to_tensor(
            self.model.explainer(np.asarray(images), np.asarray(labels)), tf.float32
        )
        if raw.shape.rank == 4:
            return tuple(hsaliency.reduce_saliency(raw, d) for d in self.definitions), logits
        return tuple(raw for _ in self.definitions), logits


class _Accumulator:
    """Collects per-example results on the host."""

    def __init__(self):
        self.ids: list[str] = []
        self.spearman: list[np.ndarray] = []
        self.dice: list[np.ndarray] = []
        self.iou: list[np.ndarray] = []
        self.correct: list[np.ndarray] = []
        self.counts = {
            "examples": 0,
            "scored": 0,
            "without_map": 0,
            "constant_saliency": 0,
            "constant_map": 0,
            "nonfinite": 0,
        }
        self.map_sum: np.ndarray | None = None

    def add_logits(self, logits: tf.Tensor | None, labels: np.ndarray) -> None:
        if logits is None:
            return
        known = labels >= 0
        predicted = np.argmax(np.asarray(logits), axis=-1)
        self.correct.append(predicted[known] == labels[known])

    def add_scores(self, scores: metrics.MapScores, batch: dict[str, np.ndarray]) -> None:
        has_map = batch["has_map"]
        valid = scores.valid.numpy() & has_map
        self.counts["examples"] += len(has_map)
        self.counts["without_map"] += int((~has_map).sum())
        self.counts["scored"] += int(valid.sum())
        self.counts["constant_saliency"] += int((scores.constant_saliency.numpy() & has_map).sum())
        self.counts["constant_map"] += int((scores.constant_map.numpy() & has_map).sum())
        self.counts["nonfinite"] += int((scores.nonfinite.numpy() & has_map).sum())
        self.ids.extend(identifier.decode("utf-8", "replace") for identifier in batch["id"][valid])
        self.spearman.append(scores.spearman.numpy()[valid].astype(np.float64))
        self.dice.append(scores.dice.numpy()[valid].astype(np.float64))
        self.iou.append(scores.iou.numpy()[valid].astype(np.float64))
        maps = batch["map"][valid].astype(np.float64)
        if len(maps):
            total = maps.sum(axis=0)
            self.map_sum = total if self.map_sum is None else self.map_sum + total

    def result(self) -> MapEvaluation:
        def join(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros([0], dtype)

        return MapEvaluation(
            ids=self.ids,
            spearman=join(self.spearman, np.float64),
            dice=join(self.dice, np.float64),
            iou=join(self.iou, np.float64),
            correct=join(self.correct, bool),
            counts=dict(self.counts),
            map_sum=self.map_sum,
            map_count=self.counts["scored"],
        )


def _host(batch: dict[str, tf.Tensor]) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in batch.items() if key != "image"}


def evaluate_map_definitions(
    model: LoadedModel,
    dataset: Iterable[dict[str, tf.Tensor]],
    definitions: Sequence[str] = hsaliency.DEFINITIONS,
    target: str = TARGET_LABEL,
    fraction: float = metrics.DEFAULT_TOP_FRACTION,
    total: int | None = None,
    progress: bool = True,
) -> dict[str, MapEvaluation]:
    """Score a model's saliency against every human map, for several saliency definitions.

    One input gradient per batch serves every definition.

    Args:
        model: the model to score.
        dataset: batches from `harmonizer.evaluation.mapsets`.
        definitions: saliency reductions of `harmonizer.saliency.DEFINITIONS`.
        target: explain the `label` logit (the predicted one where the label is unknown) or
            always the `predicted` one.
        fraction: the share of pixels Dice and IoU compare.
        total: the number of examples, for the progress bar (None when unknown).
        progress: show a progress bar.

    Returns:
        Per definition, the per-example scores of the valid examples and the counts of the
        others.
    """
    definitions = tuple(definitions)
    scorer = _Scorer(model, definitions, target, fraction)
    accumulators = [_Accumulator() for _ in definitions]
    bar = keras.utils.Progbar(total, unit_name="image") if progress else None
    pending: tuple[tuple[tf.Tensor, ...], dict[str, np.ndarray]] | None = None

    def add(all_scores, host_batch):
        for accumulator, scores in zip(accumulators, all_scores, strict=True):
            accumulator.add_scores(scores, host_batch)

    for batch in dataset:
        images = tf.convert_to_tensor(batch["image"], tf.float32)
        labels = tf.cast(batch["label"], tf.int32)
        host_batch = _host(batch)
        if not model.graph_friendly:
            saliencies, logits = scorer.eager_saliency(images, labels)
            add(scorer.scores(saliencies, batch["map"]), host_batch)
        elif pending is None:
            saliencies, logits = scorer.saliency(images, labels)
        else:
            # Metrics of the previous batch run alongside this batch's saliency.
            previous_saliencies, previous_batch = pending
            saliencies, logits, all_scores = scorer.pipelined(
                images, labels, previous_saliencies, previous_batch["map"]
            )
            add(all_scores, previous_batch)
        if model.graph_friendly:
            pending = (saliencies, host_batch)
        for accumulator in accumulators:
            accumulator.add_logits(logits, host_batch["label"])
        if bar is not None:
            bar.add(len(host_batch["label"]))

    if pending is not None:
        saliencies, host_batch = pending
        add(scorer.scores(saliencies, host_batch["map"]), host_batch)
    return {d: a.result() for d, a in zip(definitions, accumulators, strict=True)}


def evaluate_maps(
    model: LoadedModel,
    dataset: Iterable[dict[str, tf.Tensor]],
    definition: str = hsaliency.SIGNED_MEAN,
    target: str = TARGET_LABEL,
    fraction: float = metrics.DEFAULT_TOP_FRACTION,
    total: int | None = None,
    progress: bool = True,
) -> MapEvaluation:
    """Score a model's saliency of one definition against every human map of a map set.

    See `evaluate_map_definitions` for the arguments.
    """
    results = evaluate_map_definitions(
        model, dataset, (definition,), target, fraction, total, progress
    )
    return results[definition]


def center_gaussian(size: int, sigma_fraction: float = CENTER_GAUSSIAN_SIGMA) -> np.ndarray:
    """Return a [size, size] Gaussian bump centered in the image (sigma in image sides)."""
    coordinates = (np.arange(size) - (size - 1) / 2.0) / size
    rows, columns = np.meshgrid(coordinates, coordinates, indexing="ij")
    return np.exp(-(rows**2 + columns**2) / (2 * sigma_fraction**2))


def baseline_scores(
    dataset: Iterable[dict[str, tf.Tensor]],
    map_sum: np.ndarray,
    map_count: int,
    fraction: float = metrics.DEFAULT_TOP_FRACTION,
) -> dict[str, np.ndarray]:
    """Score maps that need no model against each human map.

    * `mean_map`: the center-bias baseline, the mean of all other human maps of the set
      (leave-one-out, so the predicted map is never part of its own baseline);
    * `center_gaussian`: a centered Gaussian of sigma `CENTER_GAUSSIAN_SIGMA` image sides;
    * `darkness`: 255 minus the gray level of the image.

    Returns:
        Per baseline, float64 Spearman's rho of each valid example with a map.

    Raises:
        ValueError: if fewer than two maps were scored.
    """
    if map_count < 2:
        raise ValueError(f"the center-bias baseline needs at least 2 scored maps, got {map_count}")
    scores = tf.function(metrics.map_scores, reduce_retracing=True)
    results: dict[str, list[np.ndarray]] = {name: [] for name in BASELINES}
    for batch in dataset:
        maps = batch["map"].numpy().astype(np.float64)
        has_map = batch["has_map"].numpy()
        candidates = {
            "mean_map": (map_sum[None] - maps) / (map_count - 1),
            "center_gaussian": np.broadcast_to(center_gaussian(maps.shape[-1]), maps.shape),
            "darkness": 255.0 - batch["image"].numpy().astype(np.float64).mean(axis=-1),
        }
        for name, candidate in candidates.items():
            batch_scores = scores(tf.constant(candidate), tf.constant(maps), fraction)
            valid = batch_scores.valid.numpy() & has_map
            results[name].append(batch_scores.spearman.numpy()[valid].astype(np.float64))
    return {
        name: np.concatenate(parts) if parts else np.zeros([0]) for name, parts in results.items()
    }


def center_bias_scores(
    dataset: Iterable[dict[str, tf.Tensor]],
    map_sum: np.ndarray,
    map_count: int,
    fraction: float = metrics.DEFAULT_TOP_FRACTION,
) -> np.ndarray:
    """Return the center-bias baseline's Spearman per example (`mean_map` of `baseline_scores`)."""
    return baseline_scores(dataset, map_sum, map_count, fraction)["mean_map"]


def bootstrap_std(
    values: np.ndarray, resamples: int = DEFAULT_BOOTSTRAP_RESAMPLES, seed: int = 0
) -> float:
    """Return the bootstrap standard deviation of the mean of `values` (NaN if empty)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, values.size, size=(resamples, values.size))
    return float(values[indices].mean(axis=1).std())


def summarize(
    values: np.ndarray,
    scale: float = 1.0,
    resamples: int = DEFAULT_BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, float | int | None]:
    """Return the mean, bootstrap standard deviation and count of `values` divided by `scale`.

    An empty input gives None for the mean and deviation, so reports stay valid JSON.
    """
    values = np.asarray(values, np.float64) / scale
    if values.size == 0:
        return {"mean": None, "bootstrap_std": None, "count": 0}
    return {
        "mean": float(values.mean()),
        "bootstrap_std": bootstrap_std(values, resamples, seed),
        "count": int(values.size),
    }


def map_report(
    evaluation: MapEvaluation,
    ceiling: float = metrics.HUMAN_CEILING_CLICKME,
    center_bias: np.ndarray | None = None,
    resamples: int = DEFAULT_BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Return the metrics section of a report: each metric with its bootstrap deviation.

    `center_bias` is the `mean_map` baseline's per-example Spearman, reported beside the score.
    """
    report: dict[str, Any] = {
        "counts": evaluation.counts,
        "human_ceiling": ceiling,
        "bootstrap": {"resamples": resamples, "seed": seed},
        "metrics": {
            "spearman": summarize(evaluation.spearman, 1.0, resamples, seed),
            "alignment": summarize(evaluation.spearman, ceiling, resamples, seed),
            "dice": summarize(evaluation.dice, 1.0, resamples, seed),
            "iou": summarize(evaluation.iou, 1.0, resamples, seed),
            "top1_accuracy": summarize(evaluation.correct.astype(np.float64), 1.0, resamples, seed),
        },
    }
    if center_bias is not None:
        report["center_bias_baseline"] = {
            "spearman": summarize(center_bias, 1.0, resamples, seed),
            "alignment": summarize(center_bias, ceiling, resamples, seed),
        }
    return report
