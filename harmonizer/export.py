"""Save trained models as `.keras` files and SavedModels, and load them back for scoring.

An export directory holds:

* ``model.keras``: the Keras 3 model, preprocessing layer included;
* ``saved_model/``: a TensorFlow SavedModel whose ``serving_default`` signature maps a float32
  batch ``[B, H, W, 3]`` of raw RGB in [0, 255] to logits;
* ``model_info.json``: the model name, image size, number of classes and preprocessing mode.
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from harmonizer import zoo

KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
INFO_FILE = "model_info.json"
SERVING_SIGNATURE = "serving_default"


def export_model(model: keras.Model, export_dir: str, extra_info: dict | None = None) -> dict:
    """Write ``model`` to ``export_dir`` in both formats and return the recorded info."""
    image_size = int(model.input_shape[1])
    info = {
        "name": model.name,
        "image_size": image_size,
        "num_classes": int(model.output_shape[-1]),
        "preprocessing": zoo.preprocessing_of(model),
        "input": "float32 [batch, image_size, image_size, 3], raw RGB in [0, 255]",
        "output": "logits [batch, num_classes]",
    }
    info.update(extra_info or {})
    tf.io.gfile.makedirs(export_dir)
    model.save(os.path.join(export_dir, KERAS_FILE))

    # An explicit signature with a fixed image size, so serving clients know the input shape.
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SERVING_SIGNATURE,
        fn=lambda images: model(images, training=False),
        input_signature=[
            tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")
        ],
    )
    archive.write_out(os.path.join(export_dir, SAVED_MODEL_DIR), verbose=False)

    with tf.io.gfile.GFile(os.path.join(export_dir, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    return info


def load_keras(export_dir_or_file: str) -> keras.Model:
    """Load the `.keras` model of an export directory (or a `.keras` file path)."""
    path = export_dir_or_file
    if tf.io.gfile.isdir(path):
        path = os.path.join(path, KERAS_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"no Keras model at {path!r}; export one with export_model()")
    return keras.saving.load_model(path)


def load_saved_model(export_dir_or_saved_model: str) -> keras.Model:
    """Wrap a SavedModel's serving signature as a Keras model that gradients flow through.

    Keras 3 cannot `load_model` a SavedModel, so the signature is called through
    `keras.layers.TFSMLayer`; the returned model maps images to logits and input gradients
    are taken through it as through any Keras model.
    """
    path = export_dir_or_saved_model
    if tf.io.gfile.exists(os.path.join(path, SAVED_MODEL_DIR)):
        path = os.path.join(path, SAVED_MODEL_DIR)
    if not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        raise FileNotFoundError(
            f"no SavedModel at {path!r} (saved_model.pb missing); pass an export directory "
            "or a SavedModel directory"
        )
    loaded = tf.saved_model.load(path)
    signature = loaded.signatures.get(SERVING_SIGNATURE)
    if signature is None:
        raise ValueError(
            f"SavedModel {path!r} has no {SERVING_SIGNATURE!r} signature; it has "
            f"{sorted(loaded.signatures)}"
        )
    input_spec = list(signature.structured_input_signature[1].values())[0]
    output_key = list(signature.structured_outputs)[0]
    layer = keras.layers.TFSMLayer(
        path, call_endpoint=SERVING_SIGNATURE, call_training_endpoint=None
    )
    inputs = keras.Input(tuple(input_spec.shape[1:]), name="image")
    outputs = layer(inputs)
    if isinstance(outputs, dict):
        outputs = outputs[output_key]
    return keras.Model(inputs, outputs, name="saved_model")
