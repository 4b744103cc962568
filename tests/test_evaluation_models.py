"""Tests of model loading for evaluation: Keras 2 `.h5`, SavedModels, `.keras`, explainers."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import tensorflow as tf

from harmonizer import export, zoo
from harmonizer import saliency as hsaliency
from harmonizer.evaluation import models

IMAGE_SIDE = 64
SMALL_SIDE = 32


def _images(side: int, count: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, size=(count, side, side, 3)).astype(np.float32)


def _torch_preprocess(images: np.ndarray) -> np.ndarray:
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    stddev = np.array([0.229, 0.224, 0.225], np.float32)
    return (images / 255.0 - mean) / stddev


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_keras2_h5_resnet50v2_gives_same_logits(tmp_path):
    tf_keras = pytest.importorskip("tf_keras")
    original = tf_keras.applications.ResNet50V2(
        weights=None, input_shape=(IMAGE_SIDE, IMAGE_SIDE, 3), classes=7, classifier_activation=None
    )
    # The released file name selects the architecture and preprocessing from the table.
    path = os.path.join(tmp_path, "resnet50v2_harmonized.h5")
    original.save(path)
    images = _images(IMAGE_SIDE)

    loaded = models.load_model(path, image_size=IMAGE_SIDE)
    expected = original(_torch_preprocess(images), training=False).numpy()

    assert loaded.source == "keras2_h5"
    assert loaded.preprocessing == "torch"
    assert loaded.preprocessing_origin == "table"
    np.testing.assert_allclose(loaded.logits(images).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_keras2_h5_of_unknown_name_needs_architecture(tmp_path):
    path = os.path.join(tmp_path, "mine.h5")
    with h5py.File(path, "w") as file:
        file.attrs["layer_names"] = []

    with pytest.raises(ValueError, match="pass architecture="):
        models.load_model(path)


def test_unreadable_h5_is_rejected(tmp_path):
    path = os.path.join(tmp_path, "vgg16_harmonized.h5")
    with open(path, "wb") as file:
        file.write(b"not an hdf5 file")

    with pytest.raises(ValueError, match="cannot read"):
        models.load_model(path)


def test_h5_without_keras_weights_is_rejected(tmp_path):
    path = os.path.join(tmp_path, "vgg16_harmonized.h5")
    with h5py.File(path, "w") as file:
        file.create_dataset("something", data=np.zeros(3))

    with pytest.raises(ValueError, match="without Keras weights"):
        models.load_model(path)


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_h5_of_other_architecture_is_rejected(tmp_path):
    tf_keras = pytest.importorskip("tf_keras")
    inputs = tf_keras.Input((SMALL_SIDE, SMALL_SIDE, 3))
    outputs = tf_keras.layers.Dense(4, name="mystery")(tf_keras.layers.Flatten()(inputs))
    path = os.path.join(tmp_path, "resnet50v2_harmonized.h5")
    tf_keras.Model(inputs, outputs).save(path)

    with pytest.raises(ValueError, match="no weights for layer"):
        models.load_model(path, image_size=SMALL_SIDE)


@pytest.fixture(scope="module")
def small_model():
    tf.keras.utils.set_random_seed(0)
    return zoo.build("small_cnn", num_classes=10, image_size=SMALL_SIDE)


def _reference_saliency(model, images, labels, definition):
    return hsaliency.saliency_maps(model, images, labels, definition=definition).numpy()


@pytest.mark.parametrize("definition", hsaliency.DEFINITIONS)
def test_project_saved_model_gives_same_saliency(small_model, tmp_path, definition):
    export_dir = os.path.join(tmp_path, "export")
    export.export_model(small_model, export_dir)
    images = _images(SMALL_SIDE)
    labels = tf.constant([1, 4, 9])
    saved_model_dir = os.path.join(export_dir, export.SAVED_MODEL_DIR)

    loaded = models.load_model(saved_model_dir)
    maps = loaded.saliency(images, labels, definition).numpy()

    assert loaded.source == "saved_model"
    assert loaded.preprocessing == "tf"
    assert loaded.preprocessing_origin == "recorded"
    np.testing.assert_allclose(
        maps, _reference_saliency(small_model, images, labels, definition), atol=1e-6
    )


def test_plain_saved_model_gives_same_saliency(small_model, tmp_path):
    path = os.path.join(tmp_path, "plain")
    tf.saved_model.save(small_model, path)
    images = _images(SMALL_SIDE, seed=1)
    labels = tf.constant([0, 2, 3])

    # The zoo model preprocesses inside, so the saved graph takes raw pixels.
    loaded = models.load_model(path, preprocessing="none")
    maps = loaded.saliency(images, labels, hsaliency.SIGNED_MEAN).numpy()

    assert loaded.preprocessing_origin == "given"
    np.testing.assert_allclose(
        maps, _reference_saliency(small_model, images, labels, hsaliency.SIGNED_MEAN), atol=1e-6
    )


def test_plain_saved_model_without_preprocessing_is_rejected(small_model, tmp_path):
    path = os.path.join(tmp_path, "plain")
    tf.saved_model.save(small_model, path)

    with pytest.raises(ValueError, match="does not record its input preprocessing"):
        models.load_model(path)


def test_keras_file_records_preprocessing(small_model, tmp_path):
    path = os.path.join(tmp_path, "model.keras")
    small_model.save(path)
    images = _images(SMALL_SIDE)

    loaded = models.load_model(path)

    assert loaded.preprocessing == "tf"
    assert loaded.preprocessing_origin == "recorded"
    np.testing.assert_allclose(loaded.logits(images), small_model(images), atol=1e-5)
    with pytest.raises(ValueError, match="records preprocessing 'tf' but 'torch'"):
        models.load_model(path, preprocessing="torch")


@pytest.mark.parametrize("preprocessing", ["bgr", "imagenet", ""])
def test_unknown_preprocessing_is_rejected(preprocessing):
    with pytest.raises(ValueError, match="unknown preprocessing"):
        models.check_preprocessing(preprocessing, "model")


def test_unknown_model_spec_is_rejected():
    with pytest.raises(ValueError, match="cannot load model 'no_such_model'"):
        models.load_model("no_such_model")


def test_explainer_wraps_user_functions():
    def explain(images, labels):
        return images.mean(axis=-1) * (labels[:, None, None] + 1)

    def predict(images):
        return np.tile(np.arange(5, dtype=np.float32), (len(images), 1))

    loaded = models.load_explainer(explain, predict, name="user")
    images = _images(SMALL_SIDE, count=2)
    labels = np.array([0, 1])

    maps = loaded.saliency(images, labels).numpy()

    assert loaded.preprocessing == "none"
    assert not loaded.graph_friendly
    np.testing.assert_allclose(maps, explain(images, labels), rtol=1e-6)
    np.testing.assert_array_equal(np.argmax(loaded.logits(images), axis=-1), [4, 4])


def test_explainer_spec_must_name_a_function():
    with pytest.raises(ValueError, match="expected 'module:function'"):
        models.load_explainer("numpy")
    with pytest.raises(ValueError, match="has no function"):
        models.load_explainer("numpy:no_such_function")


def test_released_table_names_known_architectures():
    for file_name, entry in models.RELEASED_MODELS.items():
        architecture = entry.architecture
        if architecture.startswith("zoo:"):
            assert architecture.removeprefix("zoo:") in zoo.names(), file_name
        else:
            assert architecture in models.APPLICATIONS, file_name
        assert entry.preprocessing in models.PREPROCESSING_CHOICES, file_name
