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

from harmonizer import layers as hlayers

PREPROCESSING_LAYER_NAME = "preprocessing"

# Channel widths of the four stride-2 blocks of the small CPU networks.
SMALL_CNN_WIDTHS = (32, 64, 128, 128)
SMALL_RESNET_WIDTHS = (16, 32, 64)
SMALL_NET_KERNEL_SIZE = 3
# Keras's BatchNormalization defaults (momentum 0.99, epsilon 1e-3) suit these small nets.


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


def build(name: str, num_classes: int = 1000, image_size: int = 224, **kwargs) -> keras.Model:
    """Build the registered model ``name`` with random weights.

    Args:
        name: A name from ``names()``.
        num_classes: Number of logits.
        image_size: Height and width of the square input in pixels.
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
    if image_size < spec.min_image_size or image_size % spec.image_size_multiple:
        raise ValueError(
            f"Model {name!r} needs image_size >= {spec.min_image_size} and a multiple of "
            f"{spec.image_size_multiple}, got image_size={image_size}."
        )

    backbone = spec.builder(num_classes=num_classes, image_size=image_size, **kwargs)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    pixels = hlayers.ImagePreprocessing(spec.preprocessing, name=PREPROCESSING_LAYER_NAME)(inputs)
    logits = backbone(pixels)
    return keras.Model(inputs, logits, name=name)


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
    """A stem conv and one basic residual block per width, each after the first at stride 2."""
    inputs = keras.Input((image_size, image_size, 3))
    x = _conv_bn_relu(inputs, widths[0], strides=1, name="stem")
    for index, filters in enumerate(widths):
        x = _residual_block(x, filters, strides=1 if index == 0 else 2, name=f"stage{index + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="small_resnet_backbone")


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
