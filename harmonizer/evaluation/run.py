"""One evaluation run, from a validated configuration to a JSON-ready report.

`experiments/evaluate.py` only turns flags into an `EvaluationConfig` and calls
`run_evaluation`, so tests and notebooks run the same code.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image

from harmonizer import metrics
from harmonizer import saliency as hsaliency
from harmonizer.evaluation import figures, mapsets, models, psychophysics, scoring

DEFAULT_BATCH_SIZE = 32
DEFAULT_PANEL_COUNT = 4


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Settings of one evaluation run: the model, the data and the scoring options.

    Attributes:
        model_path: a `.keras` file, export directory, SavedModel, Keras 2 `.h5` or zoo name.
        explainer: `module:function` of a user explainer, instead of `model_path`.
        predict: `module:function` returning logits, for an explainer.
        preprocessing: the mode of `models.PREPROCESSING_CHOICES` for foreign models.
        architecture: the architecture of a `.h5` that is not a released file.
        weights_path: weights for a zoo model.
        data_pattern: glob of the project's TFRecords.
        clickme_pattern: glob of ClickMe shards in their released schema.
        images_dir: folder of images paired with `maps_dir`.
        maps_dir: folder of maps named like the images.
        labels_csv: `file,label` (or a manifest with `class_index`) for folder images.
        clickme_blur: blur ClickMe maps as the ClickMe evaluation does.
        image_size: input side in pixels; 0 reads it from the model (224 if unknown).
        batch_size: examples per batch (the last partial batch is scored).
        definitions: saliency definitions to score.
        target: `label` or `predicted` (see `scoring.TARGETS`).
        top_fraction: the share of pixels Dice and IoU compare.
        ceiling: the human inter-rater ceiling dividing Spearman's rho.
        baselines: also score the model-free baseline maps (center bias and others).
        bootstrap_resamples: resamples for every bootstrap standard deviation.
        seed: seed of the bootstrap and the psychophysics noise.
        psychophysics_images_dir: images of the psychophysics test (animal/non-animal).
        psychophysics_maps_dir: importance maps deciding the revealed pixels.
        psychophysics_labels_csv: labels of the psychophysics images.
        human_curve: CSV of the human decision curve (`level,accuracy`).
        psychophysics_levels: number of log-spaced levels from 1% to 100%.
        figures_dir: where to write PNG figures; empty for none.
        panel_count: examples drawn in the map panels.
        progress: show progress bars.
    """

    model_path: str = ""
    explainer: str = ""
    predict: str = ""
    preprocessing: str = ""
    architecture: str = ""
    weights_path: str = ""
    data_pattern: str = ""
    clickme_pattern: str = ""
    images_dir: str = ""
    maps_dir: str = ""
    labels_csv: str = ""
    clickme_blur: bool = True
    image_size: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    definitions: tuple[str, ...] = hsaliency.DEFINITIONS
    target: str = scoring.TARGET_LABEL
    top_fraction: float = metrics.DEFAULT_TOP_FRACTION
    ceiling: float = metrics.HUMAN_CEILING_CLICKME
    baselines: bool = True
    bootstrap_resamples: int = scoring.DEFAULT_BOOTSTRAP_RESAMPLES
    seed: int = 0
    psychophysics_images_dir: str = ""
    psychophysics_maps_dir: str = ""
    psychophysics_labels_csv: str = ""
    human_curve: str = ""
    psychophysics_levels: int = psychophysics.NUM_LEVELS
    figures_dir: str = ""
    panel_count: int = DEFAULT_PANEL_COUNT
    progress: bool = True

    def map_sources(self) -> list[str]:
        """Return the names of the map sets given."""
        sources = []
        if self.data_pattern:
            sources.append("data_pattern")
        if self.clickme_pattern:
            sources.append("clickme_pattern")
        if self.images_dir or self.maps_dir:
            sources.append("images_dir/maps_dir")
        return sources

    def validate(self) -> None:
        """Raise `ValueError` naming the first inconsistent setting and its fix."""
        if bool(self.model_path) == bool(self.explainer):
            raise ValueError(
                "give exactly one of model_path (a .keras file, export or SavedModel directory, "
                f".h5 file or zoo name) and explainer (module:function), got model_path="
                f"{self.model_path!r}, explainer={self.explainer!r}"
            )
        sources = self.map_sources()
        if len(sources) > 1:
            raise ValueError(f"give one map set, got {sources}; run once per map set")
        if bool(self.images_dir) != bool(self.maps_dir):
            raise ValueError("images_dir and maps_dir go together; give both or neither")
        psychophysics_dirs = (self.psychophysics_images_dir, self.psychophysics_maps_dir)
        if any(psychophysics_dirs) and not all(psychophysics_dirs):
            raise ValueError(
                "psychophysics_images_dir and psychophysics_maps_dir go together; give both"
            )
        if not sources and not self.psychophysics_images_dir:
            raise ValueError(
                "nothing to score: give a map set (data_pattern, clickme_pattern or "
                "images_dir/maps_dir) or psychophysics_images_dir/psychophysics_maps_dir"
            )
        if self.human_curve and not self.psychophysics_images_dir:
            raise ValueError("human_curve needs the psychophysics test (psychophysics_images_dir)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.image_size < 0:
            raise ValueError(f"image_size must be >= 0 (0 reads the model), got {self.image_size}")
        for definition in self.definitions:
            if definition not in hsaliency.DEFINITIONS:
                raise ValueError(
                    f"saliency definition {definition!r} is unknown; use {hsaliency.DEFINITIONS}"
                )
        if self.target not in scoring.TARGETS:
            raise ValueError(f"target must be one of {scoring.TARGETS}, got {self.target!r}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.ceiling <= 0.0:
            raise ValueError(f"ceiling must be > 0, got {self.ceiling}")
        if self.psychophysics_levels < 2:
            raise ValueError(f"psychophysics_levels must be >= 2, got {self.psychophysics_levels}")


def load_configured_model(config: EvaluationConfig) -> models.LoadedModel:
    """Load the model or explainer named by `config`."""
    if config.explainer:
        return models.load_explainer(
            config.explainer, config.predict or None, image_size=config.image_size or None
        )
    return models.load_model(
        config.model_path,
        preprocessing=config.preprocessing or None,
        image_size=config.image_size or None,
        architecture=config.architecture or None,
        weights_path=config.weights_path or None,
    )


def _map_set(
    config: EvaluationConfig, image_size: int
) -> tuple[tf.data.Dataset, int | None, dict[str, Any]]:
    """Return the configured map set, its size if known, and its report description."""
    if config.clickme_pattern:
        dataset = mapsets.clickme_dataset(
            config.clickme_pattern, image_size, config.batch_size, blur=config.clickme_blur
        )
        return (
            dataset,
            None,
            {
                "kind": "clickme",
                "pattern": config.clickme_pattern,
                "clickme_blur": config.clickme_blur,
            },
        )
    if config.data_pattern:
        dataset = mapsets.records_dataset(config.data_pattern, image_size, config.batch_size)
        return dataset, None, {"kind": "records", "pattern": config.data_pattern}
    dataset, count = mapsets.folder_dataset(
        config.images_dir,
        config.maps_dir,
        image_size,
        config.batch_size,
        labels_csv=config.labels_csv or None,
    )
    description = {
        "kind": "folder",
        "images_dir": config.images_dir,
        "maps_dir": config.maps_dir,
        "labels_csv": config.labels_csv or None,
    }
    return dataset, count, description


def _score_map_set(
    config: EvaluationConfig, model: models.LoadedModel, image_size: int
) -> dict[str, Any]:
    dataset, total, description = _map_set(config, image_size)
    description["image_size"] = image_size
    definitions = config.definitions
    evaluations = scoring.evaluate_map_definitions(
        model, dataset, definitions, config.target, config.top_fraction, total, config.progress
    )
    first = evaluations[definitions[0]]

    baselines = None
    if config.baselines and first.map_sum is not None and first.map_count >= 2:
        baselines = scoring.baseline_scores(
            dataset, first.map_sum, first.map_count, config.top_fraction
        )
    resamples, seed = config.bootstrap_resamples, config.seed
    center_bias = baselines["mean_map"] if baselines else None
    section: dict[str, Any] = {
        "data": description,
        "saliency": {
            definition: scoring.map_report(evaluation, config.ceiling, center_bias, resamples, seed)
            for definition, evaluation in evaluations.items()
        },
    }
    if baselines is not None:
        section["baselines"] = {
            name: {
                "spearman": scoring.summarize(values, 1.0, resamples, seed),
                "alignment": scoring.summarize(values, config.ceiling, resamples, seed),
            }
            for name, values in baselines.items()
        }
    if config.figures_dir:
        _draw_panels(config, model, dataset, definitions[0])
    return section


def _draw_panels(
    config: EvaluationConfig, model: models.LoadedModel, dataset: tf.data.Dataset, definition: str
) -> None:
    batch = next(iter(dataset.unbatch().filter(lambda e: e["has_map"]).batch(config.panel_count)))
    if model.graph_friendly:
        saliencies, _ = scoring.gradient_saliency(
            model, batch["image"], batch["label"], (definition,), config.target
        )
        saliency_maps = saliencies[0].numpy()
    else:
        saliency_maps = model.saliency(batch["image"], batch["label"], definition).numpy()
    titles = [os.path.basename(value.decode("utf-8", "replace")) for value in batch["id"].numpy()]
    path = os.path.join(config.figures_dir, f"panels_{definition}.png")
    figures.plot_map_panels(
        batch["image"].numpy(), batch["map"].numpy(), saliency_maps, path, titles
    )


def load_psychophysics_set(
    images_dir: str, maps_dir: str, labels_csv: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Read images and importance maps at the stimulus size, with their animal labels.

    Returns:
        images [N, 256, 256, 3], maps [N, 256, 256], is_animal bool [N], and how many images
        were skipped for lack of a map.

    Raises:
        ValueError: if no image has a map, or an image with a map has no known label.
    """
    pairs = mapsets.find_image_map_pairs(images_dir, maps_dir)
    labels = mapsets.read_labels_csv(labels_csv) if labels_csv else {}
    size = (psychophysics.STIMULUS_SIZE, psychophysics.STIMULUS_SIZE)
    images, maps, animal, skipped = [], [], [], 0
    for image_path, map_path in pairs:
        if map_path is None:
            skipped += 1
            continue
        stem = os.path.splitext(os.path.basename(image_path))[0]
        if stem not in labels:
            raise ValueError(
                f"psychophysics image {image_path!r} has no label; list it in the labels CSV "
                "so its animal/non-animal answer is known"
            )
        images.append(np.asarray(Image.open(image_path).convert("RGB").resize(size), np.float32))
        maps.append(np.asarray(Image.open(map_path).convert("L").resize(size), np.float32))
        animal.append(psychophysics.is_animal_class(np.array(labels[stem])))
    if not images:
        raise ValueError(f"no image under {images_dir!r} has a map under {maps_dir!r}")
    return np.stack(images), np.stack(maps), np.array(animal, bool), skipped


def _run_psychophysics(config: EvaluationConfig, model: models.LoadedModel) -> dict[str, Any]:
    images, maps, animal, skipped = load_psychophysics_set(
        config.psychophysics_images_dir,
        config.psychophysics_maps_dir,
        config.psychophysics_labels_csv or None,
    )
    levels = psychophysics.default_levels(config.psychophysics_levels)
    stimuli, _ = psychophysics.make_stimuli(images, maps, levels, seed=config.seed)
    logits_fn = tf.function(model.logits, reduce_retracing=True)
    if not model.graph_friendly:
        logits_fn = model.logits
    decided_animal = psychophysics.decisions(
        logits_fn, stimuli, model.image_size, config.batch_size
    )
    correct = decided_animal == animal[None, :]
    human = psychophysics.read_human_curve(config.human_curve) if config.human_curve else None
    report = psychophysics.psychophysics_report(
        correct, levels, human, config.bootstrap_resamples, config.seed
    )
    report["skipped_without_map"] = skipped
    report["animal_images"] = int(animal.sum())
    if config.figures_dir:
        curves = {model.name: (levels, np.array(report["normalized_accuracy"]))}
        human_points = None
        if human is not None:
            human_points = (human[0], psychophysics.normalize_curve(human[1])[0])
        path = os.path.join(config.figures_dir, "decision_curves.png")
        figures.plot_decision_curves(curves, path, human=human_points)
    return report


def _legacy_summary(section: dict[str, Any]) -> dict[str, Any]:
    """Return the top-level keys of the former entrypoint's report, for existing readers."""
    summary: dict[str, Any] = {}
    saliency = section["saliency"]
    first = next(iter(saliency.values()))
    summary["top1"] = first["metrics"]["top1_accuracy"]["mean"]
    summary["examples"] = first["counts"]["examples"]
    summary["examples_scored"] = first["counts"]["scored"]
    if hsaliency.SIGNED_MEAN in saliency:
        summary["alignment"] = saliency[hsaliency.SIGNED_MEAN]["metrics"]["alignment"]["mean"]
    if hsaliency.ABS_MAX in saliency:
        summary["alignment_abs"] = saliency[hsaliency.ABS_MAX]["metrics"]["alignment"]["mean"]
    return summary


def run_evaluation(config: EvaluationConfig) -> dict[str, Any]:
    """Load the model, score the configured map set and psychophysics test, draw figures.

    Returns:
        The JSON-ready report.
    """
    config.validate()
    model = load_configured_model(config)
    if config.image_size and model.image_size and config.image_size != model.image_size:
        raise ValueError(
            f"image_size={config.image_size} does not match the {model.image_size}-pixel input "
            "of the model; drop --image_size to use the model's own size"
        )
    image_size = config.image_size or model.image_size or models.DEFAULT_IMAGE_SIZE
    if config.figures_dir:
        os.makedirs(config.figures_dir, exist_ok=True)

    report: dict[str, Any] = {
        "model": {**model.describe(), "path": config.model_path or config.explainer},
        "target": config.target,
        "top_fraction": config.top_fraction,
        "ceiling": config.ceiling,
    }
    if config.map_sources():
        section = _score_map_set(config, model, image_size)
        report.update(section)
        report.update(_legacy_summary(section))
    if config.psychophysics_images_dir:
        report["psychophysics"] = _run_psychophysics(config, model)
    return report
