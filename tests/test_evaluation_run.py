"""End-to-end tests of an evaluation run, as `python -m experiments.evaluate` performs it."""

from __future__ import annotations

import json
import os

import pytest
import tensorflow as tf

from harmonizer import export, zoo
from harmonizer.evaluation import run
from tests.conftest import PHOTOS_DIR

IMAGE_SIDE = 32


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> str:
    tf.keras.utils.set_random_seed(0)
    model = zoo.build("small_cnn", num_classes=1000, image_size=IMAGE_SIDE)
    directory = str(tmp_path_factory.mktemp("export") / "export")
    export.export_model(model, directory)
    return directory


def test_export_on_records_keeps_former_report_keys(export_dir, tiny_records):
    config = run.EvaluationConfig(
        model_path=export_dir,
        data_pattern=os.path.join(tiny_records, "val-*"),
        batch_size=5,
        bootstrap_resamples=50,
        progress=False,
    )

    report = run.run_evaluation(config)

    assert report["model"]["preprocessing"] == "tf"
    assert report["model"]["preprocessing_origin"] == "recorded"
    assert report["examples"] == 16
    assert report["examples_scored"] == 8
    assert set(report["saliency"]) == {"signed_mean", "abs_max"}
    assert set(report["baselines"]) == {"mean_map", "center_gaussian", "darkness"}
    assert report["alignment"] == pytest.approx(
        report["saliency"]["signed_mean"]["metrics"]["alignment"]["mean"]
    )
    signed = report["saliency"]["signed_mean"]
    assert signed["center_bias_baseline"]["spearman"]["count"] == 8
    assert signed["metrics"]["spearman"]["bootstrap_std"] >= 0.0
    json.dumps(report)


def test_psychophysics_and_figures(tmp_path):
    pytest.importorskip("matplotlib")
    human = tmp_path / "human.csv"
    human.write_text("level,accuracy\n1,0.55\n10,0.7\n100,0.85\n")
    figures_dir = tmp_path / "figures"
    masks = os.path.join(PHOTOS_DIR, "masks", "val")
    manifest = os.path.join(PHOTOS_DIR, "manifest.csv")
    config = run.EvaluationConfig(
        model_path="small_cnn",
        image_size=IMAGE_SIDE,
        images_dir=os.path.join(PHOTOS_DIR, "val"),
        maps_dir=masks,
        labels_csv=manifest,
        definitions=("abs_max",),
        psychophysics_images_dir=os.path.join(PHOTOS_DIR, "val"),
        psychophysics_maps_dir=masks,
        psychophysics_labels_csv=manifest,
        human_curve=str(human),
        psychophysics_levels=3,
        bootstrap_resamples=20,
        figures_dir=str(figures_dir),
        progress=False,
    )

    report = run.run_evaluation(config)
    result = report["psychophysics"]

    assert result["images"] == 41
    assert result["skipped_without_map"] == 99
    assert len(result["accuracy"]) == 3
    assert result["l2_distance_to_humans"]["value"] >= 0.0
    assert report["saliency"]["abs_max"]["counts"]["scored"] == 41
    assert sorted(os.listdir(figures_dir)) == ["decision_curves.png", "panels_abs_max.png"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({}, "give exactly one of model_path"),
        ({"model_path": "small_cnn"}, "nothing to score"),
        ({"model_path": "small_cnn", "data_pattern": "a", "clickme_pattern": "b"}, "one map set"),
        ({"model_path": "small_cnn", "images_dir": "a"}, "go together"),
        ({"model_path": "small_cnn", "data_pattern": "a", "batch_size": 0}, "batch_size"),
        ({"model_path": "small_cnn", "data_pattern": "a", "definitions": ("grad",)}, "unknown"),
        ({"model_path": "small_cnn", "data_pattern": "a", "human_curve": "h.csv"}, "needs the"),
    ],
)
def test_invalid_config_is_rejected(changes, message):
    config = run.EvaluationConfig(**changes)

    with pytest.raises(ValueError, match=message):
        config.validate()


def test_image_size_other_than_model_rejected(export_dir, tiny_records):
    config = run.EvaluationConfig(
        model_path=export_dir,
        data_pattern=os.path.join(tiny_records, "val-*"),
        image_size=2 * IMAGE_SIDE,
        progress=False,
    )
    with pytest.raises(ValueError, match=f"does not match the {IMAGE_SIDE}-pixel input"):
        run.run_evaluation(config)
