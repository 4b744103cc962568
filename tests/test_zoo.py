"""Tests of the model registry: each paper architecture trains one harmonized step on CPU."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from harmonizer import layers as hlayers
from harmonizer import zoo
from harmonizer.model import Harmonizer

PAPER_MODELS = ("resnet50", "resnet50v2", "vgg16", "efficientnetb0", "vit_b16")
SMALL_MODELS = ("small_cnn", "small_resnet", "small_vit")
IMAGE_SIZE = 32
NUM_CLASSES = 5
BATCH = 2
DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def _batch(batch_size=BATCH):
    rng = np.random.default_rng(0)
    features = {
        "image": rng.uniform(0, 255, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32"),
        "map": rng.uniform(0, 1, (batch_size, IMAGE_SIZE, IMAGE_SIZE)).astype("float32"),
        "has_map": np.ones(batch_size, "float32"),
    }
    labels = rng.integers(0, NUM_CLASSES, batch_size).astype("int32")
    return features, labels


def _normalization_layers(model):
    return [
        layer
        for layer in zoo.all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization | keras.layers.LayerNormalization)
    ]


@pytest.mark.parametrize("name", PAPER_MODELS + SMALL_MODELS)
def test_zoo_model_takes_harmonized_step(name):
    """One real fit step with exact normalization only; most weights must move."""
    keras.utils.set_random_seed(0)
    backbone = zoo.build(name, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)
    harmonizer = Harmonizer(backbone, harmonization_weight=1.0, weight_decay=1e-5)
    # Eager, because tracing the second-order graph of the big models takes minutes on CPU.
    harmonizer.compile(optimizer=keras.optimizers.SGD(0.01), run_eagerly=True)
    for layer in _normalization_layers(backbone):
        assert isinstance(
            layer, hlayers.ExactBatchNormalization | hlayers.ExactLayerNormalization
        ), layer.name
    # Preprocessing happens once, in the recorded ImagePreprocessing layer.
    for layer in zoo.all_layers(backbone):
        assert not isinstance(layer, keras.layers.Rescaling | keras.layers.Normalization)
    before = [v.numpy() for v in backbone.trainable_variables]

    history = harmonizer.fit(tf.data.Dataset.from_tensors(_batch()), verbose=0).history

    for part in ("loss", "cross_entropy", "harmonization", "weight_decay"):
        assert np.isfinite(history[part][-1]), part
    assert history["harmonization"][-1] > 0
    changed = [
        not np.array_equal(b, v.numpy())
        for b, v in zip(before, backbone.trainable_variables, strict=True)
    ]
    assert np.mean(changed) > 0.9


def test_zoo_logits_out_raw_pixels_in():
    model = zoo.build("small_cnn", num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)
    assert model.input_shape == (None, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert model.output_shape == (None, NUM_CLASSES)
    assert model.layers[1].name == zoo.PREPROCESSING_LAYER_NAME
    outputs = model(np.full((2, IMAGE_SIZE, IMAGE_SIZE, 3), 255.0, "float32"))
    assert not np.allclose(np.sum(outputs, axis=-1), 1.0)


def test_zoo_saved_model_keeps_preprocessing(tmp_path):
    model = zoo.build("small_vit", num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)
    path = tmp_path / "vit.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert zoo.preprocessing_of(loaded) == zoo.preprocessing_of("small_vit") == "tf"
    images = _batch()[0]["image"]
    np.testing.assert_allclose(loaded(images), model(images), rtol=1e-5, atol=1e-5)
    assert len(_normalization_layers(loaded)) == 2 * zoo.SMALL_VIT["num_layers"] + 1
    for layer in _normalization_layers(loaded):
        assert isinstance(layer, hlayers.ExactLayerNormalization)


def test_zoo_synchronized_batch_norm_is_saved(tmp_path):
    model = zoo.build(
        "small_cnn", num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, synchronized_batch_norm=True
    )
    path = tmp_path / "small.keras"
    model.save(path)
    layers = _normalization_layers(keras.saving.load_model(path))
    assert layers
    assert all(layer.synchronized for layer in layers)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet50", "caffe"), ("vgg16", "caffe"), ("resnet50v2", "tf"), ("efficientnetb0", "torch")],
)
def test_zoo_preprocessing_of_name(name, expected):
    assert zoo.preprocessing_of(name) == expected


def test_zoo_names_include_paper_models():
    assert set(PAPER_MODELS + SMALL_MODELS) <= set(zoo.names())


def test_zoo_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="choose one of .*resnet50"):
        zoo.build("resnet51")


@pytest.mark.parametrize(("name", "size"), [("vit_b16", 40), ("resnet50", 16), ("small_cnn", 8)])
def test_zoo_rejects_bad_image_size(name, size):
    with pytest.raises(ValueError, match="image_size"):
        zoo.build(name, num_classes=NUM_CLASSES, image_size=size)


def test_zoo_rejects_zero_classes():
    with pytest.raises(ValueError, match="num_classes"):
        zoo.build("small_cnn", num_classes=0, image_size=IMAGE_SIZE)


def test_zoo_preprocessing_of_plain_model_raises():
    inputs = keras.Input((4, 4, 3))
    plain = keras.Model(inputs, keras.layers.Flatten()(inputs), name="plain")
    with pytest.raises(ValueError, match="no ImagePreprocessing layer"):
        zoo.preprocessing_of(plain)


def test_zoo_docs_list_every_model():
    text = DOCS.read_text()
    for name in zoo.names():
        assert f"`{name}`" in text, name
