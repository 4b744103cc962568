"""Saliency sub-batch: the same loss and gradients as the formulas, in fewer second-order passes.

The reference below writes a two-block conv net by hand with raw TensorFlow ops and computes the
sub-batch objective from its definition. It is the cross-entropy of the whole batch plus the
harmonization term of the selected mapped examples. Each of their saliencies is the example's
own input gradient, with batch normalization using the whole-batch moments held constant in x.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from harmonizer import data, losses, zoo
from harmonizer import layers as hlayers
from harmonizer.model import Harmonizer

IMAGE_SIZE = 32
BATCH_SIZE = 8
NUM_CLASSES = 5
WIDTHS = (6, 8)
WEIGHT_DECAY = 1e-4
LEARNING_RATE = 1.0


def tiny_net(batch_norm: bool, seed: int = 0) -> keras.Model:
    """Conv (stride 2) [+ BN] + ReLU twice, global average pooling, dense logits."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    for index, width in enumerate(WIDTHS):
        x = keras.layers.Conv2D(
            width, 3, strides=2, padding="same", use_bias=False, name=f"conv{index}"
        )(x)
        if batch_norm:
            x = hlayers.ExactBatchNormalization(name=f"bn{index}")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    logits = keras.layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, logits)


def harmonizer_for(backbone: keras.Model, subbatch: int) -> Harmonizer:
    model = Harmonizer(backbone, weight_decay=WEIGHT_DECAY, saliency_subbatch=subbatch)
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
    return model


@pytest.fixture(scope="module")
def photo_batch(tiny_records):
    """Eight real photos at 32 px with their maps, and the indices of those that have one."""
    config = data.PipelineConfig(
        f"{tiny_records}/train-*", 16, IMAGE_SIZE, training=True, seed=4, deterministic=True
    )
    features, labels = next(iter(data.build_dataset(config)))
    with_map = np.flatnonzero(features["has_map"].numpy())
    without_map = np.flatnonzero(features["has_map"].numpy() == 0)
    assert len(with_map) >= 6, "fixture batch has too few mapped photos"
    assert len(without_map) >= 2, "fixture batch has too few unmapped photos"
    # Mapped and unmapped photos interleaved, so the selection has to skip unmapped ones.
    order = np.array([without_map[0], *with_map[:3], without_map[1], *with_map[3:6]])
    images = tf.gather(features["image"], order)
    maps = tf.gather(features["map"], order)
    return images, maps, tf.gather(labels, order) % NUM_CLASSES


def batch_with(photo_batch, mapped_positions):
    """The photo batch with ``has_map`` set at the given positions and zero maps elsewhere."""
    images, maps, labels = photo_batch
    has_map = np.zeros(BATCH_SIZE, np.float32)
    has_map[list(mapped_positions)] = 1.0
    maps = maps * has_map[:, None, None]
    return {"image": images, "map": maps, "has_map": tf.constant(has_map)}, labels


def step_gradients(model: Harmonizer, features, labels):
    """Run one real SGD step and return (logs, the gradient of each backbone weight).

    The gradients are read from the weight change, in ``backbone.trainable_variables`` order.
    """
    variables = model.backbone.trainable_variables
    before = [v.numpy() for v in variables]
    logs = model.train_on_batch(features, labels, return_dict=True)
    gradients = [(b - v.numpy()) / LEARNING_RATE for b, v in zip(before, variables, strict=True)]
    return logs, gradients


def reference_objective(backbone, features, labels, selected):
    """The sub-batch objective of the hand-written net, and its parts."""
    convs = [backbone.get_layer(f"conv{i}") for i in range(len(WIDTHS))]
    norms = [backbone.get_layer(f"bn{i}") for i in range(len(WIDTHS))]
    dense = backbone.get_layer("logits")

    def forward(images, moments=None):
        x = images / 127.5 - 1.0
        computed = []
        for index, (conv, norm) in enumerate(zip(convs, norms, strict=True)):
            x = tf.nn.conv2d(x, conv.kernel, strides=2, padding="SAME")
            if moments is None:
                mean = tf.reduce_mean(x, axis=[0, 1, 2])
                variance = tf.reduce_mean(tf.square(x - mean), axis=[0, 1, 2])
                computed.append((mean, variance))
            else:
                mean, variance = moments[index]
            x = (x - mean) * tf.math.rsqrt(variance + norm.epsilon) * norm.gamma + norm.beta
            x = tf.nn.relu(x)
        pooled = tf.reduce_mean(x, axis=[1, 2])
        return tf.matmul(pooled, dense.kernel) + dense.bias, computed

    targets = tf.one_hot(labels, NUM_CLASSES)
    logits, moments = forward(features["image"])
    cross_entropy = tf.reduce_mean(losses.per_example_cross_entropy(logits, targets))

    sub_images = tf.gather(features["image"], selected)
    with tf.GradientTape() as inner:
        inner.watch(sub_images)
        sub_logits, _ = forward(sub_images, moments)
        target = tf.reduce_sum(sub_logits * tf.gather(targets, selected))
    sub_saliency = tf.reduce_mean(inner.gradient(target, sub_images), axis=-1)
    per_example = losses.per_example_harmonization_loss(
        sub_saliency, tf.gather(features["map"], selected)
    )
    harmonization = losses.masked_mean(per_example, tf.gather(features["has_map"], selected))
    decay = losses.weight_decay_loss([conv.kernel for conv in convs] + [dense.kernel])
    total = cross_entropy + harmonization + WEIGHT_DECAY * decay
    return total, harmonization, moments


# (mapped positions, k, positions the sub-batch must select in top_k order).
SELECTION_CASES = {
    "fewer_mapped_than_k": ([1, 2, 3], 4, [1, 2, 3, 0]),
    "one_mapped": ([5], 4, [5, 0, 1, 2]),
    "none_mapped": ([], 4, [0, 1, 2, 3]),
    "more_mapped_than_k": ([1, 2, 3, 5, 6, 7], 4, [1, 2, 3, 5]),
    "k_is_whole_batch": ([1, 2, 3], BATCH_SIZE, [1, 2, 3, 0, 4, 5, 6, 7]),
}


@pytest.mark.parametrize("case", list(SELECTION_CASES), ids=list(SELECTION_CASES))
def test_batch_norm_step_matches_reference(photo_batch, case):
    mapped, subbatch, selected = SELECTION_CASES[case]
    features, labels = batch_with(photo_batch, mapped)
    backbone = tiny_net(batch_norm=True)
    model = harmonizer_for(backbone, subbatch)

    with tf.GradientTape() as tape:
        total, harmonization, moments = reference_objective(
            backbone, features, labels, tf.constant(selected)
        )
    expected = tape.gradient(total, backbone.trainable_variables)
    moving_before = [backbone.get_layer(f"bn{i}").moving_mean.numpy() for i in range(2)]

    logs, gradients = step_gradients(model, features, labels)

    assert logs["loss"] == pytest.approx(float(total), rel=1e-5)
    assert logs["harmonization"] == pytest.approx(float(harmonization), rel=1e-5, abs=1e-7)
    if not mapped:
        assert logs["harmonization"] == 0.0
    for variable, actual, wanted in zip(
        backbone.trainable_variables, gradients, expected, strict=True
    ):
        np.testing.assert_allclose(
            actual, wanted.numpy(), rtol=2e-4, atol=2e-6, err_msg=variable.path
        )
    # Moving averages move once per step, by the whole-batch moments.
    for index, before in enumerate(moving_before):
        norm = backbone.get_layer(f"bn{index}")
        updated = before * norm.momentum + moments[index][0].numpy() * (1 - norm.momentum)
        np.testing.assert_allclose(norm.moving_mean.numpy(), updated, rtol=1e-5, atol=1e-7)
    coverage = min(1.0, subbatch / len(mapped)) if mapped else 1.0
    assert logs["subbatch_coverage"] == pytest.approx(coverage)


def test_without_batch_norm_equals_full_batch(photo_batch):
    """Without cross-example layers, k covering every mapped example changes nothing."""
    features, labels = batch_with(photo_batch, [1, 2, 3, 6])
    full = harmonizer_for(tiny_net(batch_norm=False), subbatch=0)
    sub = harmonizer_for(tiny_net(batch_norm=False), subbatch=4)

    full_logs, full_gradients = step_gradients(full, features, labels)
    sub_logs, sub_gradients = step_gradients(sub, features, labels)

    for name in ("loss", "cross_entropy", "harmonization", "weight_decay"):
        assert sub_logs[name] == pytest.approx(full_logs[name], rel=1e-5), name
    assert full_logs["harmonization"] > 0
    for variable, actual, wanted in zip(
        sub.backbone.trainable_variables, sub_gradients, full_gradients, strict=True
    ):
        np.testing.assert_allclose(actual, wanted, rtol=1e-4, atol=1e-6, err_msg=variable.path)


def test_fit_with_subbatch_on_records(tiny_records):
    keras.utils.set_random_seed(0)
    backbone = zoo.build("small_cnn", num_classes=1000, image_size=IMAGE_SIZE)
    model = Harmonizer(backbone, saliency_subbatch=4)
    model.compile(optimizer=keras.optimizers.SGD(0.02, momentum=0.9))
    train = data.build_dataset(
        data.PipelineConfig(f"{tiny_records}/train-*", 8, IMAGE_SIZE, training=True, seed=0)
    )
    history = model.fit(train, epochs=2, steps_per_epoch=3, verbose=0)
    for name in ("loss", "harmonization", "subbatch_coverage"):
        assert np.all(np.isfinite(history.history[name])), name
    assert history.history["harmonization"][-1] > 0
    assert 0 < history.history["subbatch_coverage"][-1] <= 1


def test_negative_subbatch_rejected():
    with pytest.raises(ValueError, match="saliency_subbatch must be >= 0"):
        Harmonizer(tiny_net(batch_norm=False), saliency_subbatch=-1)


def test_plain_batch_norm_rejected():
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.BatchNormalization(name="plain_bn")(inputs)
    outputs = keras.layers.Dense(NUM_CLASSES)(keras.layers.GlobalAveragePooling2D()(x))
    with pytest.raises(ValueError, match="'plain_bn' is a plain keras.layers.BatchNormalization"):
        Harmonizer(keras.Model(inputs, outputs), saliency_subbatch=2)
    Harmonizer(keras.Model(inputs, outputs), saliency_subbatch=0)
    Harmonizer(keras.Model(inputs, outputs), harmonization_weight=0.0, saliency_subbatch=2)


TWO_REPLICA_SCRIPT = """
import json
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras

from harmonizer import zoo
from harmonizer.model import Harmonizer

rng = np.random.default_rng(0)
features = {
    "image": rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32"),
    "map": rng.uniform(0, 1, (8, 32, 32)).astype("float32"),
    # Replica 0 gets examples 0-3 and selects 1, 2; replica 1 gets 4-7 and selects 4, 7.
    "has_map": np.array([0, 1, 1, 0, 1, 0, 0, 1], "float32"),
}
labels = rng.integers(0, 4, 8).astype("int32")
keras.utils.set_random_seed(0)
initial = zoo.build("small_cnn", num_classes=4, image_size=32).get_weights()


def one_step(strategy, subbatch):
    with strategy.scope():
        backbone = zoo.build(
            "small_cnn", num_classes=4, image_size=32, synchronized_batch_norm=True
        )
        backbone.set_weights(initial)
        model = Harmonizer(backbone, saliency_subbatch=subbatch)
        model.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=False)
    dataset = tf.data.Dataset.from_tensors((features, labels))
    logs = model.fit(dataset, epochs=1, verbose=0).history
    weights = [w.tolist() for w in backbone.get_weights()]
    return {name: values[-1] for name, values in logs.items()}, weights


one_logs, one_weights = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), 4)
two_logs, two_weights = one_step(
    tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), 2
)
print(json.dumps({
    "logs": [one_logs, two_logs],
    "max_weight_difference": max(
        float(np.max(np.abs(np.array(a) - np.array(b))))
        for a, b in zip(one_weights, two_weights)
    ),
    "max_weight_change": max(
        float(np.max(np.abs(np.array(a) - np.array(b))))
        for a, b in zip(one_weights, initial)
    ),
}))
"""


def test_two_replicas_match_one_device():
    """Two replicas with k = 2 each equal one device with k = 4 when the selections agree.

    It runs in a subprocess, because the CPU must be split into logical devices before
    TensorFlow initializes.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", TWO_REPLICA_SCRIPT],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    one, two = report["logs"]
    for name in ("loss", "cross_entropy", "harmonization", "weight_decay"):
        assert two[name] == pytest.approx(one[name], rel=1e-4), name
    assert one["harmonization"] > 0
    assert one["subbatch_coverage"] == pytest.approx(1.0)
    assert two["subbatch_coverage"] == pytest.approx(1.0)
    assert report["max_weight_change"] > 1e-4
    assert report["max_weight_difference"] < 1e-4 * max(1.0, report["max_weight_change"])
