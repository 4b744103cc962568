"""Registry of classifiers that can be harmonized, built by name without downloading weights.

Every model takes raw RGB pixels in [0, 255] of shape ``[batch, image_size, image_size, 3]``
and returns logits (no softmax). Its first layer is an ``ImagePreprocessing`` layer named
``"preprocessing"`` whose ``mode`` is saved with the model, and every normalization layer in it
has exact second-order gradients (see ``harmonizer.layers``). ``docs/models.md`` lists the
preprocessing and normalization of each model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

from harmonizer import layers as hlayers

PREPROCESSING_LAYER_NAME = "preprocessing"

# Channel widths of the four stride-2 blocks of the small CPU networks.
SMALL_CNN_WIDTHS = (32, 64, 128, 128)
SMALL_RESNET_WIDTHS = (16, 32, 64)
SMALL_NET_KERNEL_SIZE = 3
# Keras's BatchNormalization defaults (momentum 0.99, epsilon 1e-3) suit these small nets.

# ViT-B/16 (Dosovitskiy et al., 2021, table 1): patch 16, 12 layers, width 768, MLP 3072,
# 12 heads, layer-norm epsilon 1e-6.
VIT_B16 = {
    "patch_size": 16,
    "num_layers": 12,
    "hidden_size": 768,
    "mlp_size": 3072,
    "num_heads": 12,
}
VIT_LAYER_NORM_EPSILON = 1e-6
# A 4-layer ViT of width 64 with patch 8, for CPU tests at 32-64 px.
SMALL_VIT = {
    "patch_size": 8,
    "num_layers": 4,
    "hidden_size": 64,
    "mlp_size": 128,
    "num_heads": 4,
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model.

    Attributes:
        name: Registry name.
        builder: ``builder(num_classes, image_size, **kwargs)`` returning the backbone, which
            takes preprocessed pixels.
        preprocessing: ``ImagePreprocessing`` mode applied before the backbone.
        normalization: The normalization layers the model uses, for documentation.
        min_image_size: Smallest supported ``image_size`` in pixels.
        image_size_multiple: ``image_size`` must be a multiple of this.
    """

    name: str
    builder: Callable[..., keras.Model]
    preprocessing: str
    normalization: str
    min_image_size: int = 32
    image_size_multiple: int = 1


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry.

    Raises:
        ValueError: When the name is already registered or the preprocessing mode is unknown.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"Model name {spec.name!r} is already registered; pick another name.")
    if spec.preprocessing not in hlayers.PREPROCESSING_MODES:
        raise ValueError(
            f"Model {spec.name!r} has unknown preprocessing={spec.preprocessing!r}; use one of "
            f"{sorted(hlayers.PREPROCESSING_MODES)}."
        )
    _REGISTRY[spec.name] = spec
    return spec


def names() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(_REGISTRY)


def spec_of(name: str) -> ModelSpec:
    """Return the ``ModelSpec`` registered as ``name``.

    Raises:
        ValueError: When ``name`` is not registered; the message lists the valid names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown model name={name!r}; choose one of {names()}.") from None


def preprocessing_of(name_or_model: str | keras.Model) -> str:
    """Return the preprocessing mode of a registered name or of a built or loaded model.

    For a model, the mode is read from its ``"preprocessing"`` layer, so it also works on a
    model loaded from a ``.keras`` file.

    Raises:
        ValueError: When the name is unknown or the model has no ``ImagePreprocessing`` layer.
    """
    if isinstance(name_or_model, str):
        return spec_of(name_or_model).preprocessing
    for layer in name_or_model.layers:
        if isinstance(layer, hlayers.ImagePreprocessing):
            return layer.mode
    raise ValueError(
        f"Model {name_or_model.name!r} has no ImagePreprocessing layer; build it with "
        "harmonizer.zoo.build so its preprocessing is recorded."
    )


def check_image_size(name: str, image_size: int) -> None:
    """Raise ValueError when model ``name`` cannot be built at ``image_size`` pixels."""
    spec = spec_of(name)
    if image_size < spec.min_image_size or image_size % spec.image_size_multiple:
        raise ValueError(
            f"Model {name!r} needs image_size >= {spec.min_image_size} and a multiple of "
            f"{spec.image_size_multiple}, got image_size={image_size}."
        )


def build(
    name: str,
    num_classes: int = 1000,
    image_size: int = 224,
    synchronized_batch_norm: bool = False,
    **kwargs,
) -> keras.Model:
    """Build the registered model ``name`` with random weights.

    Args:
        name: A name from ``names()``.
        num_classes: Number of logits.
        image_size: Height and width of the square input in pixels.
        synchronized_batch_norm: Compute batch statistics over all replicas of the
            distribution strategy instead of per replica, so N replicas train exactly as one
            device on the global batch (at the cost of two all-reduces per layer).
        **kwargs: Passed to the model's builder (for example ``width`` or ``dropout``).

    Returns:
        A functional ``keras.Model`` named ``name`` from raw RGB in [0, 255] to logits.

    Raises:
        ValueError: For an unknown name, a non-positive ``num_classes`` or an unsupported
            ``image_size``.
    """
    spec = spec_of(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
    check_image_size(name, image_size)

    backbone = spec.builder(num_classes=num_classes, image_size=image_size, **kwargs)
    for layer in all_layers(backbone):
        if isinstance(layer, hlayers.ExactBatchNormalization):
            layer.synchronized = synchronized_batch_norm

    inputs = keras.Input((image_size, image_size, 3), name="image")
    # float32 even under a mixed policy, so the caffe mean subtraction keeps its precision.
    pixels = hlayers.ImagePreprocessing(
        spec.preprocessing, name=PREPROCESSING_LAYER_NAME, dtype="float32"
    )(inputs)
    logits = backbone(pixels)
    return keras.Model(inputs, logits, name=name)


def all_layers(model: keras.Model):
    """Yield every layer of ``model``, descending into nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def _conv_bn_relu(x, filters: int, strides: int, name: str):
    x = keras.layers.Conv2D(
        filters,
        SMALL_NET_KERNEL_SIZE,
        strides=strides,
        padding="same",
        use_bias=False,
        name=f"{name}_conv",
    )(x)
    x = hlayers.ExactBatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _build_small_cnn(
    num_classes: int, image_size: int, widths: tuple[int, ...] = SMALL_CNN_WIDTHS
) -> keras.Model:
    """Stride-2 conv + BN + ReLU blocks, global average pooling and a dense head."""
    inputs = keras.Input((image_size, image_size, 3))
    x = inputs
    for index, filters in enumerate(widths):
        x = _conv_bn_relu(x, filters, strides=2, name=f"block{index + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="small_cnn_backbone")


def _residual_block(x, filters: int, strides: int, name: str):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(
            filters, 1, strides=strides, use_bias=False, name=f"{name}_proj_conv"
        )(x)
        shortcut = hlayers.ExactBatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = _conv_bn_relu(x, filters, strides=strides, name=f"{name}_a")
    y = keras.layers.Conv2D(
        filters, SMALL_NET_KERNEL_SIZE, padding="same", use_bias=False, name=f"{name}_b_conv"
    )(y)
    y = hlayers.ExactBatchNormalization(name=f"{name}_b_bn")(y)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _build_small_resnet(
    num_classes: int, image_size: int, widths: tuple[int, ...] = SMALL_RESNET_WIDTHS
) -> keras.Model:
    """Build a stem conv, then one residual block per width (stride 2 after the first)."""
    inputs = keras.Input((image_size, image_size, 3))
    x = _conv_bn_relu(inputs, widths[0], strides=1, name="stem")
    for index, filters in enumerate(widths):
        x = _residual_block(x, filters, strides=1 if index == 0 else 2, name=f"stage{index + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="small_resnet_backbone")


def _exact_normalization(layer: keras.layers.Layer) -> keras.layers.Layer:
    """Clone ``layer``, replacing Keras normalization layers by their exact-gradient versions."""
    config = layer.get_config()
    if isinstance(layer, keras.layers.BatchNormalization):
        return hlayers.ExactBatchNormalization.from_config(config)
    if isinstance(layer, keras.layers.LayerNormalization):
        return hlayers.ExactLayerNormalization.from_config(config)
    return layer.__class__.from_config(config)


def _without_builtin_preprocessing(layer: keras.layers.Layer) -> keras.layers.Layer:
    """Clone ``layer`` as ``_exact_normalization`` does, and drop the input scaling layers.

    ``keras.applications.EfficientNetB0`` starts with ``Rescaling(1/255)`` and an unadapted
    ``Normalization``. The zoo records preprocessing in one ``ImagePreprocessing`` layer
    instead, so those two become identities.
    """
    if isinstance(layer, keras.layers.Rescaling | keras.layers.Normalization):
        return keras.layers.Identity(name=layer.name)
    return _exact_normalization(layer)


def _from_keras_applications(
    application: Callable[..., keras.Model],
    num_classes: int,
    image_size: int,
    clone_function: Callable[[keras.layers.Layer], keras.layers.Layer] = _exact_normalization,
) -> keras.Model:
    """Build a ``keras.applications`` model without weights and swap its normalization."""
    model = application(
        include_top=True,
        weights=None,
        input_shape=(image_size, image_size, 3),
        classes=num_classes,
        classifier_activation=None,
    )
    return keras.models.clone_model(model, clone_function=clone_function)


def _build_resnet50(num_classes: int, image_size: int) -> keras.Model:
    return _from_keras_applications(keras.applications.ResNet50, num_classes, image_size)


def _build_resnet50v2(num_classes: int, image_size: int) -> keras.Model:
    return _from_keras_applications(keras.applications.ResNet50V2, num_classes, image_size)


def _build_vgg16(num_classes: int, image_size: int) -> keras.Model:
    return _from_keras_applications(keras.applications.VGG16, num_classes, image_size)


def _build_efficientnetb0(num_classes: int, image_size: int) -> keras.Model:
    return _from_keras_applications(
        keras.applications.EfficientNetB0,
        num_classes,
        image_size,
        clone_function=_without_builtin_preprocessing,
    )


@keras.saving.register_keras_serializable(package=hlayers.SERIALIZATION_PACKAGE)
class ClassTokenAndPosition(keras.layers.Layer):
    """Prepend a learned class token to a token sequence and add learned position embeddings.

    Input ``[batch, tokens, width]``, output ``[batch, tokens + 1, width]``.
    """

    def build(self, input_shape):
        num_tokens, width = input_shape[1], input_shape[2]
        self.class_token = self.add_weight(
            shape=(1, 1, width), name="class_token", initializer="zeros"
        )
        self.position_embedding = self.add_weight(
            shape=(1, num_tokens + 1, width),
            name="position_embedding",
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )

    def call(self, tokens):
        batch_size = tf.shape(tokens)[0]
        class_token = tf.cast(self.class_token, tokens.dtype)
        class_tokens = tf.tile(class_token, [batch_size, 1, 1])
        sequence = tf.concat([class_tokens, tokens], axis=1)
        return sequence + tf.cast(self.position_embedding, tokens.dtype)

    def compute_output_shape(self, input_shape):
        num_tokens = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], num_tokens, input_shape[2])


@keras.saving.register_keras_serializable(package=hlayers.SERIALIZATION_PACKAGE)
class ClassTokenOutput(keras.layers.Layer):
    """Select the class token (position 0) of a ``[batch, tokens, width]`` sequence."""

    def call(self, sequence):
        return sequence[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


def _vit_encoder_block(x, num_heads: int, mlp_size: int, dropout: float, name: str):
    hidden_size = x.shape[-1]
    y = hlayers.ExactLayerNormalization(epsilon=VIT_LAYER_NORM_EPSILON, name=f"{name}_ln1")(x)
    y = keras.layers.MultiHeadAttention(
        num_heads=num_heads,
        key_dim=hidden_size // num_heads,
        dropout=dropout,
        name=f"{name}_attention",
    )(y, y)
    y = keras.layers.Dropout(dropout, name=f"{name}_attention_dropout")(y)
    x = keras.layers.Add(name=f"{name}_add1")([x, y])

    y = hlayers.ExactLayerNormalization(epsilon=VIT_LAYER_NORM_EPSILON, name=f"{name}_ln2")(x)
    y = keras.layers.Dense(mlp_size, activation="gelu", name=f"{name}_mlp1")(y)
    y = keras.layers.Dropout(dropout, name=f"{name}_mlp_dropout1")(y)
    y = keras.layers.Dense(hidden_size, name=f"{name}_mlp2")(y)
    y = keras.layers.Dropout(dropout, name=f"{name}_mlp_dropout2")(y)
    return keras.layers.Add(name=f"{name}_add2")([x, y])


def _build_vit(
    num_classes: int,
    image_size: int,
    patch_size: int,
    num_layers: int,
    hidden_size: int,
    mlp_size: int,
    num_heads: int,
    dropout: float = 0.0,
    name: str = "vit_backbone",
) -> keras.Model:
    """Build a Vision Transformer: patch embedding, class token, pre-norm encoder, linear head."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}.")
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(
        hidden_size, patch_size, strides=patch_size, padding="valid", name="patch_embedding"
    )(inputs)
    x = keras.layers.Reshape((-1, hidden_size), name="patch_tokens")(x)
    x = ClassTokenAndPosition(name="class_token_and_position")(x)
    x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    for index in range(num_layers):
        x = _vit_encoder_block(x, num_heads, mlp_size, dropout, name=f"encoder{index}")
    x = hlayers.ExactLayerNormalization(epsilon=VIT_LAYER_NORM_EPSILON, name="encoder_norm")(x)
    class_output = ClassTokenOutput(name="class_output")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(class_output)
    return keras.Model(inputs, logits, name=name)


def _build_vit_b16(num_classes: int, image_size: int, dropout: float = 0.0) -> keras.Model:
    return _build_vit(num_classes, image_size, dropout=dropout, name="vit_b16_backbone", **VIT_B16)


def _build_small_vit(num_classes: int, image_size: int, dropout: float = 0.0) -> keras.Model:
    return _build_vit(
        num_classes, image_size, dropout=dropout, name="small_vit_backbone", **SMALL_VIT
    )


register(
    ModelSpec(
        name="resnet50",
        builder=_build_resnet50,
        preprocessing="caffe",
        normalization="ExactBatchNormalization (epsilon 1.001e-5), after every convolution",
    )
)
register(
    ModelSpec(
        name="resnet50v2",
        builder=_build_resnet50v2,
        preprocessing="tf",
        normalization="ExactBatchNormalization (epsilon 1.001e-5), pre-activation",
    )
)
register(
    ModelSpec(
        name="vgg16",
        builder=_build_vgg16,
        preprocessing="caffe",
        normalization="none (VGG16 has no normalization layer)",
    )
)
register(
    ModelSpec(
        name="efficientnetb0",
        builder=_build_efficientnetb0,
        preprocessing="torch",
        normalization="ExactBatchNormalization (Keras defaults), after every convolution",
    )
)
register(
    ModelSpec(
        name="vit_b16",
        builder=_build_vit_b16,
        preprocessing="tf",
        normalization="ExactLayerNormalization (epsilon 1e-6), pre-norm",
        image_size_multiple=VIT_B16["patch_size"],
        min_image_size=VIT_B16["patch_size"],
    )
)
register(
    ModelSpec(
        name="small_cnn",
        builder=_build_small_cnn,
        preprocessing="tf",
        normalization="ExactBatchNormalization",
        min_image_size=2 ** len(SMALL_CNN_WIDTHS),
    )
)
register(
    ModelSpec(
        name="small_resnet",
        builder=_build_small_resnet,
        preprocessing="tf",
        normalization="ExactBatchNormalization",
        min_image_size=2 ** len(SMALL_RESNET_WIDTHS),
    )
)
register(
    ModelSpec(
        name="small_vit",
        builder=_build_small_vit,
        preprocessing="tf",
        normalization="ExactLayerNormalization (epsilon 1e-6), pre-norm",
        image_size_multiple=SMALL_VIT["patch_size"],
        min_image_size=SMALL_VIT["patch_size"],
    )
)
