"""Tests of the map sets and the evaluation loop on shards made from the vendored photos.

The maps are the vendored object silhouettes, stand-ins for human ClickMe maps.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
from PIL import Image

from harmonizer import saliency as hsaliency
from harmonizer import zoo
from harmonizer.evaluation import mapsets, models, scoring
from tests.conftest import PHOTOS_DIR, encode_jpeg, load_manifest, mask_path

CLICKME_SIDE = 256
IMAGE_SIDE = 32
NUM_EXAMPLES = 7
BATCH_SIZE = 3


def _masked_rows(count: int) -> list[dict[str, str]]:
    return [row for row in load_manifest() if os.path.exists(mask_path(row))][:count]


def _clickme_example(row: dict[str, str]) -> bytes:
    image = Image.open(os.path.join(PHOTOS_DIR, row["file"])).convert("RGB")
    image = np.asarray(image.resize((CLICKME_SIDE, CLICKME_SIDE), Image.BILINEAR))
    mask = Image.open(mask_path(row)).convert("L").resize((CLICKME_SIDE, CLICKME_SIDE))
    heatmap = tf.io.encode_jpeg(np.asarray(mask)[:, :, None]).numpy()
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encode_jpeg(image)])),
        "heatmap": tf.train.Feature(bytes_list=tf.train.BytesList(value=[heatmap])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(row["class_index"])])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@pytest.fixture(scope="module")
def clickme_shard(tmp_path_factory) -> str:
    """One shard of 7 examples in the released ClickMe validation schema."""
    path = str(tmp_path_factory.mktemp("clickme") / "val-0.tfrecords")
    with tf.io.TFRecordWriter(path) as writer:
        for row in _masked_rows(NUM_EXAMPLES):
            writer.write(_clickme_example(row))
    return path


@pytest.fixture(scope="module")
def small_model() -> models.LoadedModel:
    tf.keras.utils.set_random_seed(0)
    return models.load_model("small_cnn", image_size=IMAGE_SIDE)


def _scipy_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        return np.array(
            [
                scipy.stats.spearmanr(x.ravel(), y.ravel()).statistic
                for x, y in zip(a, b, strict=True)
            ]
        )


def test_clickme_dataset_decodes_released_schema(clickme_shard):
    dataset = mapsets.clickme_dataset(clickme_shard, IMAGE_SIDE, BATCH_SIZE)

    batches = list(dataset)
    sizes = [int(batch["label"].shape[0]) for batch in batches]

    assert sizes == [3, 3, 1]
    assert batches[0]["image"].shape == (3, IMAGE_SIDE, IMAGE_SIDE, 3)
    assert batches[0]["map"].shape == (3, IMAGE_SIDE, IMAGE_SIDE)
    assert float(tf.reduce_max(batches[0]["image"])) <= 255.0
    expected_labels = [int(row["class_index"]) for row in _masked_rows(NUM_EXAMPLES)]
    assert np.concatenate([b["label"].numpy() for b in batches]).tolist() == expected_labels


def test_gaussian_kernel_is_normalized_and_symmetric():
    kernel = mapsets.gaussian_kernel(10, 10.0).numpy()[:, :, 0, 0]

    assert abs(kernel.sum() - 1.0) < 1e-6
    np.testing.assert_allclose(kernel, kernel.T, atol=1e-9)
    np.testing.assert_allclose(kernel, kernel[::-1, ::-1], atol=1e-9)


def test_evaluation_scores_last_partial_batch(small_model, clickme_shard):
    dataset = mapsets.clickme_dataset(clickme_shard, IMAGE_SIDE, BATCH_SIZE)

    evaluation = scoring.evaluate_maps(small_model, dataset, progress=False)

    assert evaluation.counts["examples"] == NUM_EXAMPLES
    assert evaluation.counts["scored"] == NUM_EXAMPLES
    assert len(evaluation.spearman) == NUM_EXAMPLES
    assert len(evaluation.correct) == NUM_EXAMPLES


@pytest.mark.parametrize("definition", hsaliency.DEFINITIONS)
def test_evaluation_matches_per_image_scipy(small_model, clickme_shard, definition):
    dataset = mapsets.clickme_dataset(clickme_shard, IMAGE_SIDE, BATCH_SIZE)
    batch = next(iter(mapsets.clickme_dataset(clickme_shard, IMAGE_SIDE, NUM_EXAMPLES)))

    evaluation = scoring.evaluate_maps(small_model, dataset, definition, progress=False)
    expected_maps = small_model.saliency(batch["image"], batch["label"], definition).numpy()
    expected = _scipy_spearman(expected_maps, batch["map"].numpy())

    np.testing.assert_allclose(evaluation.spearman, expected, atol=1e-4)


def test_explainer_evaluation_equals_gradient_evaluation(small_model, clickme_shard):
    def explain(images, labels):
        return small_model.saliency(images, labels, hsaliency.SIGNED_MEAN).numpy()

    explainer = models.load_explainer(explain, name="user")
    dataset = mapsets.clickme_dataset(clickme_shard, IMAGE_SIDE, BATCH_SIZE)

    by_explainer = scoring.evaluate_maps(explainer, dataset, progress=False)
    by_gradient = scoring.evaluate_maps(small_model, dataset, progress=False)

    np.testing.assert_allclose(by_explainer.spearman, by_gradient.spearman, atol=1e-4)
    assert by_explainer.counts == by_gradient.counts


def _write_folder(root: str, rows: list[dict[str, str]], constant_stem: str | None) -> None:
    for row in rows:
        stem = os.path.splitext(os.path.basename(row["file"]))[0]
        image_dir = os.path.join(root, "images", row["synset"])
        map_dir = os.path.join(root, "maps", row["synset"])
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(map_dir, exist_ok=True)
        image = Image.open(os.path.join(PHOTOS_DIR, row["file"])).convert("RGB").resize((48, 48))
        image.save(os.path.join(image_dir, stem + ".jpg"))
        mask = Image.open(mask_path(row)).convert("L").resize((48, 48))
        if stem == constant_stem:
            mask = Image.new("L", (48, 48), 128)
        mask.save(os.path.join(map_dir, stem + ".png"))


def test_folder_with_constant_map_and_missing_map(small_model, tmp_path):
    rows = _masked_rows(5)
    constant_stem = os.path.splitext(os.path.basename(rows[1]["file"]))[0]
    _write_folder(str(tmp_path), rows, constant_stem)
    # One image without a map must be counted, not dropped silently.
    Image.new("RGB", (48, 48), (10, 20, 30)).save(os.path.join(tmp_path, "images", "extra.png"))
    manifest = os.path.join(PHOTOS_DIR, "manifest.csv")

    dataset, count = mapsets.folder_dataset(
        str(tmp_path / "images"), str(tmp_path / "maps"), IMAGE_SIDE, 4, labels_csv=manifest
    )
    evaluation = scoring.evaluate_maps(small_model, dataset, progress=False)
    report = scoring.map_report(evaluation)

    assert count == 6
    assert evaluation.counts["examples"] == 6
    assert evaluation.counts["without_map"] == 1
    assert evaluation.counts["constant_map"] == 1
    assert evaluation.counts["scored"] == 4
    assert np.isfinite(report["metrics"]["spearman"]["mean"])
    assert report["metrics"]["spearman"]["count"] == 4


def test_records_dataset_counts_unmapped(small_model, tiny_records):
    dataset = mapsets.records_dataset(os.path.join(tiny_records, "val-*"), IMAGE_SIDE, 5)

    evaluation = scoring.evaluate_maps(small_model, dataset, progress=False)

    assert evaluation.counts["examples"] == 16
    assert evaluation.counts["without_map"] == 8
    assert evaluation.counts["scored"] == 8


def test_center_bias_is_leave_one_out(clickme_shard):
    dataset = mapsets.clickme_dataset(clickme_shard, IMAGE_SIDE, BATCH_SIZE)
    maps = np.concatenate([batch["map"].numpy() for batch in dataset]).astype(np.float64)

    scores = scoring.center_bias_scores(dataset, maps.sum(axis=0), len(maps))
    others = (maps.sum(axis=0)[None] - maps) / (len(maps) - 1)

    np.testing.assert_allclose(scores, _scipy_spearman(others, maps), atol=1e-6)


def test_center_bias_needs_two_maps(clickme_shard):
    dataset = mapsets.clickme_dataset(clickme_shard, IMAGE_SIDE, BATCH_SIZE)

    with pytest.raises(ValueError, match="at least 2 scored maps"):
        scoring.center_bias_scores(dataset, np.zeros([IMAGE_SIDE, IMAGE_SIDE]), 1)


def test_bootstrap_std_matches_standard_error():
    values = np.random.default_rng(0).normal(size=400)

    deviation = scoring.bootstrap_std(values, resamples=2000, seed=1)
    standard_error = values.std() / np.sqrt(values.size)

    assert abs(deviation - standard_error) / standard_error < 0.1


def test_summary_of_nothing_is_none():
    summary = scoring.summarize(np.zeros([0]))

    assert summary == {"mean": None, "bootstrap_std": None, "count": 0}


def test_report_divides_alignment_by_ceiling():
    evaluation = scoring.MapEvaluation(
        ids=["a", "b"],
        spearman=np.array([0.2, 0.4]),
        dice=np.array([0.5, 0.5]),
        iou=np.array([0.3, 0.3]),
        correct=np.array([True, False]),
        counts={"examples": 2, "scored": 2},
        map_sum=None,
        map_count=2,
    )

    report = scoring.map_report(evaluation, ceiling=0.5)

    assert report["metrics"]["alignment"]["mean"] == pytest.approx(0.6)
    assert report["metrics"]["spearman"]["mean"] == pytest.approx(0.3)
    assert report["metrics"]["top1_accuracy"]["mean"] == pytest.approx(0.5)


def test_invalid_target_is_rejected(small_model, clickme_shard):
    dataset = mapsets.clickme_dataset(clickme_shard, IMAGE_SIDE, BATCH_SIZE)

    with pytest.raises(ValueError, match="target must be one of"):
        scoring.evaluate_maps(small_model, dataset, target="true", progress=False)


def test_missing_shards_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="no ClickMe shard files match"):
        mapsets.clickme_dataset(str(tmp_path / "nothing-*"), IMAGE_SIDE, BATCH_SIZE)


def test_zoo_model_preprocessing_conflict_is_rejected():
    with pytest.raises(ValueError, match="leave preprocessing unset"):
        models.load_model("small_cnn", preprocessing="caffe")
    assert zoo.preprocessing_of("small_cnn") == "tf"


def test_both_definitions_from_one_gradient(small_model, clickme_shard):
    dataset = mapsets.clickme_dataset(clickme_shard, IMAGE_SIDE, BATCH_SIZE)

    together = scoring.evaluate_map_definitions(
        small_model, dataset, hsaliency.DEFINITIONS, progress=False
    )

    for definition in hsaliency.DEFINITIONS:
        alone = scoring.evaluate_maps(small_model, dataset, definition, progress=False)
        np.testing.assert_allclose(together[definition].spearman, alone.spearman, atol=1e-6)
        np.testing.assert_allclose(together[definition].dice, alone.dice, atol=1e-6)


def test_model_free_baselines_match_scipy(clickme_shard):
    dataset = mapsets.clickme_dataset(clickme_shard, IMAGE_SIDE, BATCH_SIZE)
    batches = list(dataset)
    maps = np.concatenate([b["map"].numpy() for b in batches]).astype(np.float64)
    images = np.concatenate([b["image"].numpy() for b in batches]).astype(np.float64)

    scores = scoring.baseline_scores(dataset, maps.sum(axis=0), len(maps))
    gaussian = np.broadcast_to(scoring.center_gaussian(IMAGE_SIDE), maps.shape)
    darkness = 255.0 - images.mean(axis=-1)

    np.testing.assert_allclose(
        scores["center_gaussian"], _scipy_spearman(gaussian, maps), atol=1e-6
    )
    np.testing.assert_allclose(scores["darkness"], _scipy_spearman(darkness, maps), atol=1e-6)
