"""Input pipeline: record round trip, joint crop/flip of image and map, eval path, batching."""

import os

import numpy as np
import pytest
import tensorflow as tf

from harmonizer import data, records
from tests.conftest import encode_jpeg, encode_png, write_records

HEIGHT, WIDTH = 96, 128


def coordinate_image() -> np.ndarray:
    """An image whose red channel encodes the column and green channel the row."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    red = np.round(xx / (WIDTH - 1) * 255)
    green = np.round(yy / (HEIGHT - 1) * 255)
    return np.stack([red, green, np.full_like(red, 128)], axis=-1).astype(np.uint8)


def column_map(height: int, width: int) -> np.ndarray:
    """A map of the same field of view whose value encodes the column, at any resolution."""
    xx = np.mgrid[0:height, 0:width][1]
    return np.round(xx / (width - 1) * 255).astype(np.uint8)


def coordinate_record(map_height: int = HEIGHT, map_width: int = WIDTH) -> bytes:
    return records.serialize(
        records.Record(
            image_jpeg=encode_jpeg(coordinate_image()),
            label=7,
            filename="coordinates.JPEG",
            map_png=encode_png(column_map(map_height, map_width)),
            map_source="file",
        )
    )


def test_record_round_trip_keeps_label_flag_and_map(tmp_path):
    mapped = records.Record(
        encode_jpeg(coordinate_image()), 65, "a.JPEG", encode_png(column_map(HEIGHT, WIDTH)), "file"
    )
    unmapped = records.Record(encode_jpeg(coordinate_image()), 999, "b.JPEG")
    path = str(tmp_path / "train-00000-of-00001")
    write_records(path, [mapped, unmapped])
    parsed = [records.parse(s) for s in tf.data.TFRecordDataset(path)]
    assert [int(p[records.LABEL_KEY]) for p in parsed] == [65, 999]
    assert [int(p[records.HAS_MAP_KEY]) for p in parsed] == [1, 0]
    assert [p[records.MAP_SOURCE_KEY].numpy() for p in parsed] == [b"file", b"none"]
    assert [p[records.FILENAME_KEY].numpy() for p in parsed] == [b"a.JPEG", b"b.JPEG"]
    decoded = tf.io.decode_png(parsed[0][records.MAP_KEY])[..., 0].numpy()
    np.testing.assert_array_equal(decoded, column_map(HEIGHT, WIDTH))
    assert parsed[1][records.MAP_KEY].numpy() == b""


@pytest.mark.parametrize(
    "map_size", [(HEIGHT, WIDTH), (HEIGHT // 2, WIDTH // 2)], ids=["same", "half"]
)
def test_train_crop_keeps_map_aligned(map_size):
    example = records.parse(coordinate_record(*map_size))
    flips = []
    for index in range(12):
        features, label = data.preprocess(
            example, 48, training=True, seed=tf.constant([3, index], tf.int64)
        )
        red = features["image"][..., 0].numpy() / 255.0
        column = features["map"].numpy()
        # The map's value and the image's red channel both encode the source column.
        assert np.abs(red - column).mean() < 0.02, f"misaligned at seed index {index}"
        flips.append(red[:, 0].mean() > red[:, -1].mean())
        assert int(label) == 7
        assert float(features["has_map"]) == 1.0
    assert any(flips), "expected some flipped crops"
    assert not all(flips), "expected some unflipped crops"


def test_eval_path_is_center_crop():
    example = records.parse(coordinate_record())
    features, _ = data.preprocess(example, 48, training=False, center_crop_fraction=0.5)
    red = features["image"][..., 0].numpy() / 255.0
    green = features["image"][..., 1].numpy() / 255.0
    # A 48x48 window centered in the 96x128 image spans columns 40..87 and rows 24..71.
    assert red.mean() == pytest.approx(63.5 / 127, abs=0.02)
    assert green.mean() == pytest.approx(47.5 / 95, abs=0.02)
    assert np.abs(red - features["map"].numpy()).mean() < 0.02


def test_preprocess_same_eagerly_and_in_dataset_map():
    serialized = coordinate_record()
    seed = tf.constant([1, 2], tf.int64)
    eager, _ = data.preprocess(records.parse(serialized), 40, training=True, seed=seed)
    dataset = tf.data.Dataset.from_tensors((serialized, seed)).map(
        lambda s, k: data.preprocess(records.parse(s), 40, training=True, seed=k)
    )
    graph, _ = next(iter(dataset))
    np.testing.assert_allclose(graph["image"].numpy(), eager["image"].numpy(), atol=1e-4)
    np.testing.assert_allclose(graph["map"].numpy(), eager["map"].numpy(), atol=1e-6)


def test_unmapped_example_gets_zero_map():
    serialized = records.serialize(
        records.Record(encode_jpeg(coordinate_image()), 3, "no_map.JPEG")
    )
    features, _ = data.preprocess(
        records.parse(serialized), 32, training=True, seed=tf.constant([0, 0], tf.int64)
    )
    assert features["map"].shape == (32, 32)
    assert float(tf.reduce_max(tf.abs(features["map"]))) == 0.0
    assert float(features["has_map"]) == 0.0


def test_pipeline_batches_train_and_keeps_last_eval_batch(tiny_records):
    train = data.build_dataset(
        data.PipelineConfig(f"{tiny_records}/train-*", 16, 32, training=True, seed=1)
    )
    features, labels = next(iter(train))
    assert features["image"].shape == (16, 32, 32, 3)
    assert features["map"].shape == (16, 32, 32)
    assert labels.dtype == tf.int32
    validation = data.build_dataset(
        data.PipelineConfig(f"{tiny_records}/val-*", 6, 32, training=False)
    )
    sizes = [int(labels.shape[0]) for _, labels in validation]
    assert sizes == [6, 6, 4]


def test_seeded_training_pipeline_repeats_exactly(tiny_records):
    config = data.PipelineConfig(
        f"{tiny_records}/train-*", 8, 32, training=True, seed=5, deterministic=True
    )
    first, _ = next(iter(data.build_dataset(config)))
    second, _ = next(iter(data.build_dataset(config)))
    np.testing.assert_array_equal(first["image"].numpy(), second["image"].numpy())


def test_missing_shards_name_the_pattern(tmp_path):
    config = data.PipelineConfig(str(tmp_path / "train-*"), 8, 32, training=True)
    with pytest.raises(ValueError, match="no TFRecord files match .*train-\\*"):
        data.build_dataset(config)


def test_glob_matching_manifest_rejected(tiny_records):
    manifest = os.path.join(tiny_records, "manifest.json")
    with open(manifest, "w") as f:
        f.write("{}")
    try:
        config = data.PipelineConfig(f"{tiny_records}/*", 8, 32, training=False)
        with pytest.raises(ValueError, match="also matches metadata files such as .*manifest"):
            data.build_dataset(config)
    finally:
        os.remove(manifest)
