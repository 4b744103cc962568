"""Run the whole pipeline on the embedded photo set: `make demo`.

Stages, each announced on stdout:

1. write the tiny composite tree (`tfrecords.make_tiny`) and its TFRecords (`tfrecords.build`);
2. train a baseline (harmonization weight 0) and a harmonized small CNN with the settings of
   `experiments/tiny_cpu.flags` and the same seed;
3. score both on the validation composites (known objects on unseen backgrounds) and on
   `val_new_objects` (objects never seen in training), under both saliency definitions, beside
   trivial maps;
4. reload the harmonized SavedModel through `keras.layers.TFSMLayer` and score it again;
5. write `summary.json` and `maps.png` under `--output_dir`.

The maps are object silhouettes, not human data.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from harmonizer import data, saliency, training
from harmonizer.evaluation.run import EvaluationConfig, run_evaluation
from tfrecords import build as build_records
from tfrecords import make_tiny

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "runs/demo", "Folder for the tree, records, runs and summary.")
flags.DEFINE_string(
    "flagfile_path",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_cpu.flags"),
    "Training settings shared by both models.",
)
flags.DEFINE_integer("seed", 0, "Seed of the dataset and of both training runs.")
flags.DEFINE_float("epochs", 0, "Override the flagfile's epochs (0 keeps it); for quick checks.")
flags.DEFINE_integer("panel_rows", 5, "Validation photos shown in maps.png.")

SPLITS = make_tiny.SPLITS
NUM_SHARDS = {"train": 2, "val": 1, "val_new_objects": 1}
MODELS = {"baseline": 0.0, "harmonized": None}
# Largest difference accepted between the alignment of the Keras model and of its SavedModel.
SAVED_MODEL_TOLERANCE = 1e-3


def stage(message: str, start: float) -> None:
    print(f"[demo {time.time() - start:6.0f} s] {message}", flush=True)


def build_data(output_dir: str, seed: int, start: float) -> str:
    tree = os.path.join(output_dir, "tree")
    records_dir = os.path.join(output_dir, "records")
    summary = make_tiny.make_tiny(tree, seed=seed)
    stage(f"wrote composites {summary.composites} and photos {summary.photos}", start)
    config = build_records.BuildConfig(
        input_dir=tree,
        output_dir=records_dir,
        splits=SPLITS,
        num_shards=NUM_SHARDS,
        maps_dir=os.path.join(tree, "maps"),
        map_source="silhouette",
        seed=seed,
        num_workers=min(2, os.cpu_count() or 1),
        overwrite=True,
        show_progress=False,
    )
    manifest = build_records.build(config)
    skipped = len(manifest.get("skipped", []))
    stage(f"built TFRecords in {records_dir} ({skipped} files skipped)", start)
    return records_dir


def score(model_path: str, data_pattern: str) -> dict:
    """Score a saved model on a set of shards with the evaluation suite."""
    config = EvaluationConfig(model_path=model_path, data_pattern=data_pattern, progress=False)
    return run_evaluation(config)


def summarize(report: dict) -> dict:
    return {key: report[key] for key in ("top1", "alignment", "alignment_abs", "examples_scored")}


def trivial_alignments(report: dict) -> dict:
    return {name: v["alignment"]["mean"] for name, v in report.get("baselines", {}).items()}


def draw_maps(path: str, models: dict, records_dir: str, image_size: int, rows: int) -> None:
    """Save a grid: photo, mask, then each model's signed and absolute saliency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = data.build_dataset(
        data.PipelineConfig(os.path.join(records_dir, "val-*"), 64, image_size, training=False)
    )
    features, labels = next(iter(dataset))
    mapped = np.flatnonzero(features["has_map"].numpy() > 0)[:rows]
    images = tf.gather(features["image"], mapped)
    maps = tf.gather(features["map"], mapped).numpy()
    labels = tf.gather(labels, mapped)
    columns = ["photo", "silhouette (map)"]
    panels = []
    for name, model in models.items():
        gradients, _ = saliency.input_gradients(model, images, labels)
        panels.append((f"{name}\nsigned mean", saliency.reduce_saliency(gradients).numpy()))
        panels.append(
            (f"{name}\nabs max", saliency.reduce_saliency(gradients, saliency.ABS_MAX).numpy())
        )
    columns += [title for title, _ in panels]

    figure, axes = plt.subplots(
        len(mapped), len(columns), figsize=(2.2 * len(columns), 2.2 * len(mapped))
    )
    axes = np.atleast_2d(axes)
    for row in range(len(mapped)):
        axes[row, 0].imshow(images[row].numpy().astype(np.uint8))
        axes[row, 1].imshow(maps[row], cmap="gray", vmin=0, vmax=1)
        for column, (_, values) in enumerate(panels, start=2):
            limit = np.abs(values[row]).max() or 1.0
            is_signed = "signed" in columns[column]
            axes[row, column].imshow(
                values[row],
                cmap="RdBu_r" if is_signed else "magma",
                vmin=-limit if is_signed else 0,
                vmax=limit,
            )
    for column, title in enumerate(columns):
        axes[0, column].set_title(title, fontsize=9)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("Validation composites (known objects, unseen backgrounds); red = positive")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_demo(output_dir: str, flagfile: str, seed: int, epochs: float, panel_rows: int) -> dict:
    start = time.time()
    tf.io.gfile.makedirs(output_dir)
    records_dir = build_data(output_dir, seed, start)
    # A shortened run keeps the warm-up at the flagfile's share of training.
    overrides = {}
    if epochs:
        default = training.config_from_flagfile(flagfile, data_dir="", model_dir="")
        warmup = default.warmup_epochs * epochs / default.epochs
        overrides = {"epochs": epochs, "warmup_epochs": warmup}

    models, summary = {}, {}
    for name, weight in MODELS.items():
        config = training.config_from_flagfile(
            flagfile,
            data_dir=records_dir,
            model_dir=os.path.join(output_dir, name),
            seed=seed,
            **overrides,
        )
        if weight is not None:
            config = training.TrainConfig(**{**config.__dict__, "harmonization_weight": weight})
        stage(f"training {name} (harmonization_weight={config.harmonization_weight})", start)
        model, _ = training.train_model(config)
        models[name] = model.backbone
        image_size = config.image_size

        # Score the exported .keras model, as a user would get it.
        export_dir = os.path.join(config.model_dir, "export")
        reports = {
            split: score(export_dir, os.path.join(records_dir, f"{split}-*"))
            for split in ("val", "val_new_objects")
        }
        summary[name] = summarize(reports["val"])
        summary[name]["new_objects"] = summarize(reports["val_new_objects"])
        summary["trivial_maps"] = {
            split: trivial_alignments(report) for split, report in reports.items()
        }
        stage(
            f"{name}: top1 {summary[name]['top1']:.3f}, alignment {summary[name]['alignment']:.3f}"
            f" (abs {summary[name]['alignment_abs']:.3f}) on "
            f"{summary[name]['examples_scored']} validation composites",
            start,
        )

    # The exported SavedModel must score like the Keras model it came from.
    saved_model_dir = os.path.join(output_dir, "harmonized", "export", "saved_model")
    reloaded = score(saved_model_dir, os.path.join(records_dir, "val-*"))
    difference = abs(reloaded["alignment"] - summary["harmonized"]["alignment"])
    summary["harmonized_saved_model"] = summarize(reloaded)
    if difference > SAVED_MODEL_TOLERANCE:
        raise RuntimeError(
            f"the reloaded SavedModel's alignment differs by {difference:.2e} from the Keras "
            "model's; the export is broken"
        )
    stage(f"reloaded the harmonized SavedModel: alignment {reloaded['alignment']:.3f}", start)

    summary["maps"] = "object silhouettes of pasted cut-outs, not human data"
    summary["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    draw_maps(os.path.join(output_dir, "maps.png"), models, records_dir, image_size, panel_rows)
    stage(f"wrote {output_dir}/summary.json and {output_dir}/maps.png", start)
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    summary = run_demo(
        FLAGS.output_dir, FLAGS.flagfile_path, FLAGS.seed, FLAGS.epochs, FLAGS.panel_rows
    )
    print(json.dumps({k: summary[k] for k in ("baseline", "harmonized")}, indent=2))


if __name__ == "__main__":
    app.run(main)
