"""Input pipeline speed options: thread pools, order, and the uint8 shortcuts keep the values."""

import numpy as np
import pytest
import tensorflow as tf

from harmonizer import data, records
from tests.conftest import encode_jpeg, encode_png


def pipeline_options(tiny_records: str, **overrides) -> tf.data.Options:
    arguments = {"training": True, "seed": 0, **overrides}
    config = data.PipelineConfig(f"{tiny_records}/train-*", 4, 32, **arguments)
    return data.build_dataset(config).options()


def test_num_threads_gives_private_pool(tiny_records):
    options = pipeline_options(tiny_records, num_threads=3)
    assert options.threading.private_threadpool_size == 3
    assert options.threading.max_intra_op_parallelism == 1
    assert pipeline_options(tiny_records).threading.private_threadpool_size is None


def test_order_deterministic_only_when_asked(tiny_records):
    assert pipeline_options(tiny_records).deterministic is False
    assert pipeline_options(tiny_records, deterministic=True).deterministic is True
    assert pipeline_options(tiny_records, training=False).deterministic is True


def test_negative_num_threads_rejected(tiny_records):
    config = data.PipelineConfig(f"{tiny_records}/train-*", 4, 32, True, num_threads=-1)
    with pytest.raises(ValueError, match="num_threads must be >= 0"):
        data.build_dataset(config)


def test_uint8_bilinear_resize_equals_float_resize_in_range():
    pixels = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    direct = tf.image.resize(pixels, [24, 24], method="bilinear").numpy()
    via_float = tf.image.resize(pixels.astype(np.float32), [24, 24], method="bilinear").numpy()
    np.testing.assert_array_equal(direct, via_float)
    assert direct.min() >= 0.0
    assert direct.max() <= 255.0


def test_map_values_match_float_crop_and_resize():
    """The uint8 map path gives the float path's values: crop, resize, then scale to [0, 1]."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    map_pixels = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    serialized = records.serialize(
        records.Record(encode_jpeg(image), 2, "random.JPEG", encode_png(map_pixels), "file")
    )
    features, _ = data.preprocess(records.parse(serialized), 32, training=False)
    # The evaluation window of 0.875 x 60 = 52 pixels, at (4, 14), is (2, 7, 26, 26) in the
    # half-resolution map, both rounded outwards.
    expected = tf.image.resize(
        map_pixels[2:28, 7:33, None].astype(np.float32) / 255.0, [32, 32], method="bilinear"
    )[..., 0]
    np.testing.assert_allclose(features["map"].numpy(), expected.numpy(), atol=1e-6)
