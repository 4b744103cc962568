"""Tests of the exact-gradient normalization layers and the preprocessing layer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from harmonizer import layers as hlayers
from harmonizer import zoo
from harmonizer.model import Harmonizer

FD_STEP = 1e-6
# Central differences in float64 with a 1e-6 step leave about 1e-7 of relative error here,
# while Keras's BatchNormalization is off by 1e-4 to 1e-2 on the conv kernel.
FD_TOLERANCE = 1e-6


def _tiny_net(normalization: type[keras.layers.Layer]) -> keras.Model:
    """One conv block with the given normalization, in float64, seeded."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2), dtype="float64")
    x = keras.layers.Conv2D(3, 3, padding="same", activation="tanh", dtype="float64")(inputs)
    x = normalization(dtype="float64")(x)
    x = keras.layers.Activation("tanh", dtype="float64")(x)
    x = keras.layers.GlobalAveragePooling2D(dtype="float64")(x)
    outputs = keras.layers.Dense(3, dtype="float64")(x)
    return keras.Model(inputs, outputs)


def _saliency_loss(model, images, labels, target_maps):
    """A harmonization-shaped loss: squared error of the channel-mean input gradient."""
    with tf.GradientTape() as inner:
        inner.watch(images)
        logits = model(images, training=True)
        target = tf.reduce_sum(logits * tf.one_hot(labels, 3, dtype=tf.float64))
    saliency = tf.reduce_mean(inner.gradient(target, images), axis=-1)
    return tf.reduce_sum(tf.square(saliency - target_maps)) + tf.reduce_sum(logits**2)


def _max_relative_errors(normalization):
    """Compare the nested-tape gradient with central finite differences, per variable."""
    model = _tiny_net(normalization)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(4, 6, 6, 2)))
    labels = tf.constant([0, 2, 1, 0])
    target_maps = tf.constant(rng.normal(size=(4, 6, 6)))

    with tf.GradientTape() as tape:
        loss = _saliency_loss(model, images, labels, target_maps)
    analytic = tape.gradient(loss, model.trainable_variables)

    errors = {}
    for variable, gradient in zip(model.trainable_variables, analytic, strict=True):
        if gradient is None:  # The last bias does not change any input gradient.
            continue
        original = variable.numpy()
        numeric = np.zeros_like(original)
        for index in np.ndindex(original.shape):
            shifted = original.copy()
            shifted[index] += FD_STEP
            variable.assign(shifted)
            upper = _saliency_loss(model, images, labels, target_maps).numpy()
            shifted[index] -= 2 * FD_STEP
            variable.assign(shifted)
            lower = _saliency_loss(model, images, labels, target_maps).numpy()
            numeric[index] = (upper - lower) / (2 * FD_STEP)
        variable.assign(original)
        scale = np.abs(numeric).max()
        errors[variable.path] = np.abs(gradient.numpy() - numeric).max() / scale
    return errors


def test_exact_batch_norm_matches_finite_differences():
    errors = _max_relative_errors(hlayers.ExactBatchNormalization)
    assert len(errors) == 6
    for path, error in errors.items():
        assert error < FD_TOLERANCE, path


def test_keras_batch_norm_misses_second_order_term():
    """The defect ExactBatchNormalization fixes, so the test above can fail."""
    errors = _max_relative_errors(keras.layers.BatchNormalization)
    conv_kernel = next(error for path, error in errors.items() if path.endswith("kernel"))
    assert conv_kernel > 1e-4


def test_exact_layer_norm_matches_finite_differences():
    errors = _max_relative_errors(lambda dtype: hlayers.ExactLayerNormalization(dtype=dtype))
    for path, error in errors.items():
        assert error < FD_TOLERANCE, path


@pytest.mark.parametrize("training", [True, False])
def test_exact_batch_norm_matches_keras_values(training):
    rng = np.random.default_rng(1)
    inputs = tf.constant(rng.normal(2.0, 3.0, size=(5, 4, 4, 6)), tf.float32)
    exact = hlayers.ExactBatchNormalization(momentum=0.9)
    reference = keras.layers.BatchNormalization(momentum=0.9)
    exact.build(inputs.shape)
    reference.build(inputs.shape)
    gamma, beta = rng.normal(size=(2, 6))
    for layer in (exact, reference):
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)

    np.testing.assert_allclose(
        exact(inputs, training=training), reference(inputs, training=training), atol=1e-5
    )
    np.testing.assert_allclose(exact.moving_mean, reference.moving_mean, atol=1e-6)
    np.testing.assert_allclose(exact.moving_variance, reference.moving_variance, rtol=1e-5)


def test_exact_batch_norm_moving_average_formula():
    inputs = tf.constant(np.arange(24, dtype="float32").reshape(4, 6) ** 1.5)
    layer = hlayers.ExactBatchNormalization(momentum=0.8)
    layer(inputs, training=True)
    np.testing.assert_allclose(layer.moving_mean, 0.2 * inputs.numpy().mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(
        layer.moving_variance, 0.8 + 0.2 * inputs.numpy().var(axis=0), rtol=1e-5
    )


def test_exact_batch_norm_masked_moments():
    rng = np.random.default_rng(2)
    inputs = rng.normal(size=(2, 5, 3)).astype("float32")
    mask = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 1, 1]], bool)
    layer = hlayers.ExactBatchNormalization()
    layer.build(inputs.shape)
    mean, variance = layer.batch_moments(tf.constant(inputs), tf.constant(mask))
    kept = inputs[mask]
    np.testing.assert_allclose(mean, kept.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(variance, kept.var(axis=0), rtol=1e-5)


def test_exact_layer_norm_matches_keras_values():
    rng = np.random.default_rng(3)
    inputs = tf.constant(rng.normal(1.0, 2.0, size=(3, 5, 8)), tf.float32)
    exact = hlayers.ExactLayerNormalization(epsilon=1e-6)
    reference = keras.layers.LayerNormalization(epsilon=1e-6)
    exact.build(inputs.shape)
    reference.build(inputs.shape)
    gamma, beta = rng.normal(size=(2, 8))
    for layer in (exact, reference):
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    np.testing.assert_allclose(exact(inputs), reference(inputs), atol=1e-5)


def test_exact_batch_norm_bfloat16_statistics_float32():
    layer = hlayers.ExactBatchNormalization(dtype="mixed_bfloat16")
    inputs = tf.constant(np.linspace(1000.0, 1001.0, 32).reshape(8, 4), tf.bfloat16)
    outputs = layer(inputs, training=True)
    assert outputs.dtype == tf.bfloat16
    assert layer.moving_variance.dtype == "float32"
    assert np.all(np.isfinite(outputs.numpy().astype("float32")))


def test_exact_batch_norm_rejects_renorm():
    with pytest.raises(ValueError, match="renorm=False"):
        hlayers.ExactBatchNormalization(renorm=True)


@pytest.mark.parametrize("bad_mode", ["inception", "", "TF"])
def test_preprocessing_rejects_unknown_mode(bad_mode):
    with pytest.raises(ValueError, match="Unknown preprocessing mode"):
        hlayers.ImagePreprocessing(bad_mode)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("tf", [[-1.0, 0.0, 1.0]]),
        ("unit", [[0.0, 127.5 / 255.0, 1.0]]),
        ("caffe", [[255.0 - 103.939, 127.5 - 116.779, 0.0 - 123.68]]),
        (
            "torch",
            [[(0.0 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (1.0 - 0.406) / 0.225]],
        ),
    ],
)
def test_preprocessing_modes(mode, expected):
    pixels = tf.constant([[0.0, 127.5, 255.0]])
    np.testing.assert_allclose(
        hlayers.ImagePreprocessing(mode)(pixels), expected, rtol=1e-5, atol=1e-5
    )


def _one_step_gradients(jit_compile: bool):
    """Return the SGD update / learning rate of one harmonized fit step on a small CNN."""
    keras.utils.set_random_seed(0)
    backbone = zoo.build("small_cnn", num_classes=4, image_size=32, widths=(8, 16))
    harmonizer = Harmonizer(backbone, harmonization_weight=1.0, weight_decay=1e-4)
    harmonizer.compile(optimizer=keras.optimizers.SGD(1.0), jit_compile=jit_compile)
    rng = np.random.default_rng(4)
    features = {
        "image": rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32"),
        "map": rng.uniform(0, 1, (4, 32, 32)).astype("float32"),
        "has_map": np.array([1, 0, 1, 1], "float32"),
    }
    labels = np.array([0, 1, 2, 3], "int32")
    before = [v.numpy() for v in backbone.trainable_variables]
    logs = harmonizer.fit(tf.data.Dataset.from_tensors((features, labels)), verbose=0)
    after = [v.numpy() for v in backbone.trainable_variables]
    return logs.history, [b - a for b, a in zip(before, after, strict=True)]


def test_nested_tape_step_same_with_jit():
    eager_logs, eager_gradients = _one_step_gradients(jit_compile=False)
    jit_logs, jit_gradients = _one_step_gradients(jit_compile=True)
    for name in ("loss", "cross_entropy", "harmonization"):
        np.testing.assert_allclose(jit_logs[name], eager_logs[name], rtol=1e-4)
    for jit, eager in zip(jit_gradients, eager_gradients, strict=True):
        scale = np.abs(eager).max()
        np.testing.assert_allclose(jit, eager, rtol=0, atol=1e-3 * scale + 1e-12)
