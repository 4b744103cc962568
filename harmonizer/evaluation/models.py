"""Load any classifier to score, with the input preprocessing it expects.

Every loaded model is a `LoadedModel`: a function from raw RGB pixels in [0, 255] to logits,
plus where it came from and how its inputs are preprocessed. Supported sources:

* a `.keras` file saved by this project (its `ImagePreprocessing` layer records the mode);
* an export directory of `harmonizer.export` (its `model.keras` is loaded);
* a SavedModel directory, either exported by `harmonizer.export` (its `model_info.json` records
  the mode) or saved by plain `tf.saved_model.save` (give the mode). Keras 3 cannot
  `load_model` a SavedModel, so it is restored with `tf.saved_model.load` and its endpoint is
  called directly inside the gradient tape, which keeps the input gradient;
* a zoo model by name (`harmonizer.zoo`), with random or given weights;
* a Keras 2 `.h5` file such as the released harmonized models: the architecture is rebuilt in
  Keras 3 and the weights are read with h5py, layer by layer;
* any other framework through a user explainer `(images, labels) -> maps`.

Scoring with the wrong preprocessing silently gives wrong numbers, so a foreign model without a
recorded mode is rejected until a mode from `PREPROCESSING_CHOICES` is given.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable
from typing import Any

import h5py
import keras
import numpy as np
import tensorflow as tf

from harmonizer import export as hexport
from harmonizer import layers as hlayers
from harmonizer import saliency as hsaliency
from harmonizer import zoo

NO_PREPROCESSING = "none"
PREPROCESSING_CHOICES = {
    NO_PREPROCESSING: "the model takes raw RGB in [0, 255] (it preprocesses inside)",
    **hlayers.PREPROCESSING_MODES,
}

DEFAULT_IMAGE_SIZE = 224
IMAGENET_CLASSES = 1000


@dataclasses.dataclass(frozen=True)
class ReleasedModel:
    """Architecture and preprocessing of a released Keras 2 `.h5` file.

    Attributes:
        architecture: a `keras.applications` function name, or `zoo:<name>` for the zoo.
        preprocessing: the mode of `PREPROCESSING_CHOICES` the weights were trained with.
        image_size: input side in pixels.
    """

    architecture: str
    preprocessing: str
    image_size: int = DEFAULT_IMAGE_SIZE


# The harmonized models released with Fel et al. (2022). All four were trained on ImageNet
# pixels scaled to [0, 1] and standardized with the ImageNet mean and standard deviation
# (`preprocess_input` of the authors' `harmonization.models` package), the "torch" mode here.
RELEASED_MODELS = {
    "vgg16_harmonized.h5": ReleasedModel("VGG16", "torch"),
    "resnet50v2_harmonized.h5": ReleasedModel("ResNet50V2", "torch"),
    # NOTE: the authors built this one with the `efficientnet` package. Its layer names were the
    # model for keras.applications, but loading the real file has not been tried here.
    "efficientnetB0_harmonized.h5": ReleasedModel("EfficientNetB0", "torch"),
    # NOTE: the authors built the ViT with `vit_keras`; it loads only once the zoo registers a
    # `vit_b16` with the same layer names and weight shapes.
    "vit-b16_harmonized.h5": ReleasedModel("zoo:vit_b16", "torch"),
}

# keras.applications builders whose Keras 3 layer names match their Keras 2 counterparts.
APPLICATIONS = {
    "VGG16": keras.applications.VGG16,
    "ResNet50": keras.applications.ResNet50,
    "ResNet50V2": keras.applications.ResNet50V2,
    "EfficientNetB0": keras.applications.EfficientNetB0,
    "MobileNet": keras.applications.MobileNet,
    "DenseNet121": keras.applications.DenseNet121,
}


class _LogitsFunction:
    """Adapter giving a plain logits function the `(images, training=...)` call of a model."""

    def __init__(self, function: Callable[[tf.Tensor], tf.Tensor]):
        self._function = function

    def __call__(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        del training  # Restored SavedModel functions and user functions run in inference mode.
        return self._function(images)


@dataclasses.dataclass
class LoadedModel:
    """A classifier ready to score, taking raw RGB pixels in [0, 255].

    Attributes:
        name: a short name for reports.
        source: `keras`, `saved_model`, `zoo`, `keras2_h5` or `explainer`.
        preprocessing: the mode of `PREPROCESSING_CHOICES` the model expects.
        preprocessing_origin: `recorded` when read from the model file, `given` when the
            caller chose it, `table` when read from `RELEASED_MODELS`.
        image_size: the input side in pixels, None when the model accepts any size.
        forward: raw pixels -> logits (preprocessing included), or None for an explainer
            without a prediction function.
        explainer: user function `(images, labels) -> maps` replacing input gradients.
        keras_model: the Keras model when there is one.
    """

    name: str
    source: str
    preprocessing: str
    preprocessing_origin: str
    image_size: int | None
    forward: Callable[..., tf.Tensor] | None
    explainer: Callable[[np.ndarray, np.ndarray], Any] | None = None
    keras_model: keras.Model | None = None

    @property
    def graph_friendly(self) -> bool:
        """Whether saliency can be traced into a `tf.function` (False for user explainers)."""
        return self.explainer is None

    def logits(self, images: tf.Tensor) -> tf.Tensor:
        """Return float32 logits of raw RGB images in [0, 255].

        Raises:
            ValueError: for an explainer loaded without a prediction function.
        """
        if self.forward is None:
            raise ValueError(
                f"model {self.name!r} has no prediction function; pass predict='module:function' "
                "to load_explainer to score decisions or use the predicted class as target"
            )
        return tf.cast(self.forward(tf.convert_to_tensor(images, tf.float32)), tf.float32)

    def saliency(
        self, images: tf.Tensor, labels: tf.Tensor, definition: str = hsaliency.SIGNED_MEAN
    ) -> tf.Tensor:
        """Return [B, H, W] saliency maps of the given labels' logits.

        Args:
            images: [B, H, W, 3] raw RGB in [0, 255].
            labels: int [B] target classes; -1 (unknown) explains the predicted class.
            definition: a reduction of `harmonizer.saliency.DEFINITIONS`; user explainers
                return their own maps and ignore it.
        """
        if self.explainer is not None:
            maps = self.explainer(np.asarray(images), np.asarray(labels))
            maps = tf.convert_to_tensor(maps, tf.float32)
            if maps.shape.rank == 4:
                maps = hsaliency.reduce_saliency(maps, definition)
            return maps
        labels = tf.cast(labels, tf.int32)
        if bool(tf.reduce_any(labels < 0)):
            predicted = tf.argmax(self.logits(images), axis=-1, output_type=tf.int32)
            labels = tf.where(labels >= 0, labels, predicted)
        return hsaliency.saliency_maps(self.forward, images, labels, definition=definition)

    def describe(self) -> dict[str, Any]:
        """Return the JSON-ready description stored in every report."""
        return {
            "name": self.name,
            "source": self.source,
            "preprocessing": self.preprocessing,
            "preprocessing_description": PREPROCESSING_CHOICES[self.preprocessing],
            "preprocessing_origin": self.preprocessing_origin,
            "image_size": self.image_size,
        }


def check_preprocessing(preprocessing: str | None, name: str) -> str:
    """Return `preprocessing` if it is a known mode.

    Raises:
        ValueError: if it is missing or unknown; the message lists the choices.
    """
    choices = "; ".join(f"{key!r} ({text})" for key, text in PREPROCESSING_CHOICES.items())
    if preprocessing is None:
        raise ValueError(
            f"model {name!r} does not record its input preprocessing, and scoring with the "
            f"wrong one gives wrong numbers: pass preprocessing= one of {choices}"
        )
    if preprocessing not in PREPROCESSING_CHOICES:
        raise ValueError(
            f"unknown preprocessing {preprocessing!r} for {name!r}; use one of {choices}"
        )
    return preprocessing


def _resolve_recorded(recorded: str | None, given: str | None, name: str) -> tuple[str, str]:
    """Return `(mode, origin)` from the recorded and the given mode, rejecting a conflict."""
    if recorded is None:
        return check_preprocessing(given, name), "given"
    if given is not None and given != recorded:
        raise ValueError(
            f"model {name!r} records preprocessing {recorded!r} but {given!r} was given; "
            "the model applies its own preprocessing, so leave preprocessing unset"
        )
    return recorded, "recorded"


def _with_preprocessing(backbone: keras.Model, mode: str, image_size: int) -> keras.Model:
    """Put an `ImagePreprocessing` layer of `mode` in front of `backbone`."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    pixels = inputs
    if mode != NO_PREPROCESSING:
        pixels = hlayers.ImagePreprocessing(mode, name=zoo.PREPROCESSING_LAYER_NAME)(inputs)
    return keras.Model(inputs, backbone(pixels), name=backbone.name)


def _static_image_size(shape: Any) -> int | None:
    try:
        size = shape[1]
    except (IndexError, TypeError):
        return None
    return int(size) if size is not None else None


def load_keras_file(path: str, preprocessing: str | None = None) -> LoadedModel:
    """Load a `.keras` file, reading its preprocessing mode from its `ImagePreprocessing` layer.

    Raises:
        ValueError: if the file cannot be loaded, or it records no mode and none is given.
    """
    try:
        model = keras.saving.load_model(path, compile=False)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"cannot load Keras model file {path!r}: {error}") from error
    try:
        recorded = zoo.preprocessing_of(model)
    except ValueError:
        recorded = None
    name = os.path.splitext(os.path.basename(path))[0]
    mode, origin = _resolve_recorded(recorded, preprocessing, name)
    image_size = _static_image_size(model.input_shape)
    if origin == "given" and mode != NO_PREPROCESSING:
        model = _with_preprocessing(model, mode, image_size or DEFAULT_IMAGE_SIZE)
    return LoadedModel(name, "keras", mode, origin, image_size, model, keras_model=model)


def _saved_model_function(loaded: Any, path: str) -> tuple[Callable[[tf.Tensor], tf.Tensor], Any]:
    """Return a single-tensor logits function of a restored SavedModel and its input spec."""
    if hasattr(loaded, "serve"):
        specs = loaded.serve.concrete_functions[0].structured_input_signature[0]
        return loaded.serve, specs[0] if specs else None

    signatures = dict(loaded.signatures)
    if "serving_default" in signatures:
        signature = signatures["serving_default"]
    elif len(signatures) == 1:
        signature = next(iter(signatures.values()))
    else:
        raise ValueError(
            f"SavedModel {path!r} has no 'serve' endpoint and no single serving signature "
            f"(signatures: {sorted(signatures)}); re-export it with harmonizer.export.export_model"
        )
    input_specs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if len(input_specs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"SavedModel {path!r}: the serving signature must take one image tensor and return "
            f"one logits tensor, got inputs {sorted(input_specs)} and outputs {sorted(outputs)}"
        )
    input_name = next(iter(input_specs))
    output_name = next(iter(outputs))

    def logits(images: tf.Tensor) -> tf.Tensor:
        return signature(**{input_name: images})[output_name]

    return logits, input_specs[input_name]


def _export_info(saved_model_path: str) -> dict[str, Any]:
    """Return the `model_info.json` of the export directory around a SavedModel, if any."""
    parent = os.path.dirname(os.path.normpath(saved_model_path))
    for directory in (saved_model_path, parent):
        info_path = os.path.join(directory, hexport.INFO_FILE)
        if os.path.exists(info_path):
            with open(info_path, encoding="utf-8") as file:
                return json.load(file)
    return {}


def load_saved_model(path: str, preprocessing: str | None = None) -> LoadedModel:
    """Restore a SavedModel directory as a logits function that keeps input gradients.

    Raises:
        ValueError: if the directory is not a SavedModel, has no usable endpoint, or records no
            preprocessing and none is given.
    """
    nested = os.path.join(path, hexport.SAVED_MODEL_DIR)
    if not tf.saved_model.contains_saved_model(path) and tf.saved_model.contains_saved_model(
        nested
    ):
        path = nested
    if not tf.saved_model.contains_saved_model(path):
        raise ValueError(f"{path!r} is not a SavedModel directory (no saved_model.pb found)")
    loaded = tf.saved_model.load(path)
    function, spec = _saved_model_function(loaded, path)

    recorded = _export_info(path).get("preprocessing")
    name = os.path.basename(os.path.normpath(path))
    mode, origin = _resolve_recorded(recorded, preprocessing, name)

    if origin == "given" and mode != NO_PREPROCESSING:
        layer = hlayers.ImagePreprocessing(mode)

        def forward(images: tf.Tensor) -> tf.Tensor:
            return function(layer(images))

    else:
        forward = function
    image_size = _static_image_size(spec.shape) if spec is not None else None
    model = LoadedModel(name, "saved_model", mode, origin, image_size, _LogitsFunction(forward))
    # Keep the restored object alive: its variables are captured by the functions.
    model.restored = loaded  # type: ignore[attr-defined]
    return model


def load_zoo_model(
    name: str,
    num_classes: int = IMAGENET_CLASSES,
    image_size: int = DEFAULT_IMAGE_SIZE,
    weights_path: str | None = None,
) -> LoadedModel:
    """Build a zoo model (random weights unless `weights_path` is given)."""
    model = zoo.build(name, num_classes=num_classes, image_size=image_size)
    if weights_path is not None:
        model.load_weights(weights_path)
    mode = zoo.preprocessing_of(model)
    return LoadedModel(name, "zoo", mode, "recorded", image_size, model, keras_model=model)


def _read_h5_weights(path: str) -> tuple[dict[str, list[np.ndarray]], list[str], str]:
    """Return `(weights by layer name, layer names in file order, Keras version)` of an h5."""
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(
            f"cannot read {path!r} as HDF5: {error}; expected a Keras 2 model or weights .h5"
        ) from error
    with file:
        group = file["model_weights"] if "model_weights" in file else file
        if "layer_names" not in group.attrs:
            raise ValueError(
                f"{path!r} is an HDF5 file without Keras weights (no 'layer_names' attribute); "
                "save the model with Keras 2 model.save('*.h5') or save_weights('*.h5')"
            )
        version = group.attrs.get("keras_version", file.attrs.get("keras_version", b"unknown"))
        version = version.decode() if isinstance(version, bytes) else str(version)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["layer_names"]]
        weights = {}
        for name in names:
            layer_group = group[name]
            weight_names = [
                w.decode() if isinstance(w, bytes) else str(w)
                for w in layer_group.attrs["weight_names"]
            ]
            if weight_names:
                weights[name] = [np.asarray(layer_group[w]) for w in weight_names]
    return weights, [n for n in names if n in weights], version


def _assign_h5_weights(model: keras.Model, weights: dict[str, list[np.ndarray]], path: str) -> None:
    """Set each weighted layer of `model` from the h5 layer of the same name.

    Raises:
        ValueError: naming the first layer that is missing or has other shapes, or the file's
            layers that matched nothing.
    """
    unused = set(weights)
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in weights:
            raise ValueError(
                f"{path!r} has no weights for layer {layer.name!r} of the rebuilt "
                f"{model.name}; the file was saved from another architecture (file layers "
                f"start with {sorted(weights)[:5]})"
            )
        values = weights[layer.name]
        expected = [tuple(w.shape) for w in layer.weights]
        found = [tuple(v.shape) for v in values]
        if expected != found:
            raise ValueError(
                f"{path!r}: layer {layer.name!r} has weight shapes {found} in the file but "
                f"{expected} in the rebuilt {model.name}; check the architecture and image size"
            )
        layer.set_weights(values)
        unused.discard(layer.name)
    if unused:
        raise ValueError(
            f"{path!r} has weights for layers the rebuilt {model.name} lacks: {sorted(unused)[:10]}"
        )


def _num_classes_of(weights: dict[str, list[np.ndarray]], layer_order: list[str]) -> int:
    """Return the output width of the last layer with a 2-D kernel (the classifier)."""
    for name in reversed(layer_order):
        kernel = weights[name][0]
        if kernel.ndim == 2:
            return int(kernel.shape[1])
    raise ValueError("the file has no dense classifier layer, so its class count is unknown")


def _build_architecture(architecture: str, num_classes: int, image_size: int) -> keras.Model:
    """Build a backbone from raw preprocessed input to logits, with random weights."""
    if architecture.startswith("zoo:"):
        name = architecture.removeprefix("zoo:")
        if name not in zoo.names():
            raise ValueError(
                f"architecture {architecture!r} is not in the zoo (registered: {zoo.names()}); "
                "this released file cannot be rebuilt yet"
            )
        built = zoo.build(name, num_classes=num_classes, image_size=image_size)
        return built.layers[-1]
    if architecture not in APPLICATIONS:
        raise ValueError(
            f"unknown architecture {architecture!r}; use one of {sorted(APPLICATIONS)} or "
            f"'zoo:<name>' with a name of {zoo.names()}"
        )
    return APPLICATIONS[architecture](
        weights=None,
        classes=num_classes,
        input_shape=(image_size, image_size, 3),
        classifier_activation=None,
    )


def load_keras2_h5(
    path: str,
    architecture: str | None = None,
    preprocessing: str | None = None,
    image_size: int | None = None,
) -> LoadedModel:
    """Rebuild a Keras 2 `.h5` model in Keras 3 and read its weights with h5py.

    The classifier is rebuilt without its softmax, so the model returns logits. Released files
    are looked up in `RELEASED_MODELS` by file name; other files need `architecture` and
    `preprocessing`.

    Args:
        path: a `.h5` file written by Keras 2 `model.save` or `model.save_weights`.
        architecture: a name of `APPLICATIONS` or `zoo:<name>`; defaults to the table entry.
        preprocessing: a mode of `PREPROCESSING_CHOICES`; defaults to the table entry.
        image_size: the input side in pixels; defaults to the table entry or 224.

    Raises:
        ValueError: if the file cannot be read, the architecture is unknown, or a layer's
            weights do not fit the rebuilt architecture.
    """
    file_name = os.path.basename(path)
    entry = RELEASED_MODELS.get(file_name)
    architecture = architecture or (entry.architecture if entry else None)
    if architecture is None:
        raise ValueError(
            f"{file_name!r} is not a released file ({sorted(RELEASED_MODELS)}); pass "
            f"architecture= one of {sorted(APPLICATIONS)} or 'zoo:<name>'"
        )
    if preprocessing is None and entry is not None:
        preprocessing, origin = entry.preprocessing, "table"
    else:
        origin = "given"
    mode = check_preprocessing(preprocessing, file_name)
    image_size = image_size or (entry.image_size if entry else DEFAULT_IMAGE_SIZE)

    weights, layer_order, version = _read_h5_weights(path)
    num_classes = _num_classes_of(weights, layer_order)
    backbone = _build_architecture(architecture, num_classes, image_size)
    _assign_h5_weights(backbone, weights, path)
    model = _with_preprocessing(backbone, mode, image_size)
    name = os.path.splitext(file_name)[0]
    loaded = LoadedModel(name, "keras2_h5", mode, origin, image_size, model, keras_model=model)
    loaded.keras_version = version  # type: ignore[attr-defined]
    return loaded


def import_function(spec: str) -> Callable[..., Any]:
    """Import `module:function` (for user explainers and prediction functions).

    Raises:
        ValueError: if the spec has no colon, the module is missing or has no such function.
    """
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} of {spec!r}: {error}") from error
    try:
        return getattr(module, function_name)
    except AttributeError as error:
        raise ValueError(f"module {module_name!r} has no function {function_name!r}") from error


def load_explainer(
    explainer: str | Callable[[np.ndarray, np.ndarray], Any],
    predict: str | Callable[[np.ndarray], Any] | None = None,
    name: str | None = None,
    image_size: int | None = None,
) -> LoadedModel:
    """Wrap a user explainer (for example a PyTorch model) as a `LoadedModel`.

    Both functions take raw RGB in [0, 255] as NumPy arrays and do their own preprocessing, so
    the report records `none`.

    Args:
        explainer: `(images [B, H, W, 3], labels [B]) -> maps [B, H, W]`, or `module:function`.
        predict: optional `images -> logits [B, K]`, or `module:function`; needed for the
            psychophysics test and for predicted-class targets.
        name: report name, defaults to the explainer's name.
        image_size: the input side the explainer expects, or None for any.
    """
    if isinstance(explainer, str):
        name = name or explainer
        explainer = import_function(explainer)
    if isinstance(predict, str):
        predict = import_function(predict)
    forward = None
    if predict is not None:
        user_predict = predict

        def forward_function(images: tf.Tensor) -> tf.Tensor:
            return tf.convert_to_tensor(user_predict(np.asarray(images)), tf.float32)

        forward = _LogitsFunction(forward_function)
    name = name or getattr(explainer, "__name__", "explainer")
    return LoadedModel(
        name, "explainer", NO_PREPROCESSING, "given", image_size, forward, explainer=explainer
    )


def load_model(
    spec: str,
    preprocessing: str | None = None,
    image_size: int | None = None,
    architecture: str | None = None,
    num_classes: int = IMAGENET_CLASSES,
    weights_path: str | None = None,
) -> LoadedModel:
    """Load a model from a path or a zoo name.

    Args:
        spec: a `.keras` file, an export directory of `harmonizer.export` (its `.keras` file
            is used), a SavedModel directory, a Keras 2 `.h5` file, or a zoo name (optionally
            written `zoo:<name>`).
        preprocessing: the mode for models that do not record one.
        image_size: the input side for zoo models and `.h5` files.
        architecture: the architecture of a `.h5` file that is not in `RELEASED_MODELS`.
        num_classes: the class count of a zoo model.
        weights_path: weights for a zoo model.

    Raises:
        ValueError: if `spec` matches no supported form.
    """
    if spec.endswith(".keras"):
        return load_keras_file(spec, preprocessing)
    export_keras = os.path.join(spec, hexport.KERAS_FILE)
    if os.path.isdir(spec) and os.path.exists(export_keras):
        loaded = load_keras_file(export_keras, preprocessing)
        loaded.name = os.path.basename(os.path.normpath(spec))
        return loaded
    if spec.endswith(".h5"):
        return load_keras2_h5(spec, architecture, preprocessing, image_size)
    if os.path.isdir(spec):
        return load_saved_model(spec, preprocessing)
    name = spec.removeprefix("zoo:")
    if name in zoo.names():
        if preprocessing is not None and preprocessing != zoo.preprocessing_of(name):
            raise ValueError(
                f"zoo model {name!r} applies preprocessing {zoo.preprocessing_of(name)!r} "
                f"itself, but {preprocessing!r} was given; leave preprocessing unset"
            )
        return load_zoo_model(name, num_classes, image_size or DEFAULT_IMAGE_SIZE, weights_path)
    raise ValueError(
        f"cannot load model {spec!r}: expected a .keras file, a SavedModel directory, a .h5 "
        f"file or a zoo name of {zoo.names()}"
    )
