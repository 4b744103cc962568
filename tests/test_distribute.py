"""Tests of strategy selection and of one harmonized step on one versus two replicas.

The two-replica comparison runs in a subprocess, because the CPU must be split into logical
devices before TensorFlow initializes, which other tests in this process have already done.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from harmonizer import distribute

REPO_ROOT = Path(__file__).resolve().parents[1]
LEARNING_RATE = 0.5
GLOBAL_BATCH = 8
IMAGE_SIZE = 32
NUM_CLASSES = 4
LOGGED = ("loss", "cross_entropy", "harmonization", "weight_decay", "accuracy", "mapped_fraction")


def _batch():
    rng = np.random.default_rng(0)
    features = {
        "image": rng.uniform(0, 255, (GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32"),
        "map": rng.uniform(0, 1, (GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE)).astype("float32"),
        # Uneven maps per replica (3 on the first half, 1 on the second) test the scaling.
        "has_map": np.array([1, 1, 1, 0, 0, 1, 0, 0], "float32"),
    }
    labels = rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype("int32")
    return features, labels


def _one_step(strategy, initial_weights):
    """Run one real ``fit`` step; return the logs and the gradients from the SGD update."""
    import keras

    from harmonizer import model as hmodel
    from harmonizer import zoo

    features, labels = _batch()
    with strategy.scope():
        backbone = zoo.build(
            "small_cnn",
            num_classes=NUM_CLASSES,
            image_size=IMAGE_SIZE,
            synchronized_batch_norm=True,
        )
        harmonizer = hmodel.Harmonizer(
            backbone, harmonization_weight=2.0, weight_decay=1e-3, label_smoothing=0.1
        )
        harmonizer.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), jit_compile=False)
    if initial_weights is not None:
        backbone.set_weights(initial_weights)
    start = backbone.get_weights()
    before = [v.numpy() for v in backbone.trainable_variables]

    dataset = tf.data.Dataset.from_tensors((features, labels))
    history = harmonizer.fit(dataset, epochs=1, verbose=0)
    after = [v.numpy() for v in backbone.trainable_variables]
    gradients = [((b - a) / LEARNING_RATE).tolist() for b, a in zip(before, after, strict=True)]
    logs = {name: float(history.history[name][-1]) for name in LOGGED}
    return logs, gradients, start


def worker() -> None:
    """Subprocess entry point: print the logs and gradients of both strategies as JSON."""
    distribute.split_cpu(2)
    import keras

    keras.utils.set_random_seed(0)
    single_logs, single_gradients, weights = _one_step(tf.distribute.get_strategy(), None)
    mirrored = distribute.select_strategy("mirrored")
    mirrored_logs, mirrored_gradients, _ = _one_step(mirrored, weights)
    print(
        json.dumps(
            {
                "replicas": mirrored.num_replicas_in_sync,
                "single": [single_logs, single_gradients],
                "mirrored": [mirrored_logs, mirrored_gradients],
                "resumed_from": _mirrored_launch_resume(),
            }
        )
    )


def _mirrored_launch_resume() -> list[int]:
    """Run launch.run on two replicas for 2 steps, then extend it to 4; return start steps."""
    import tempfile
    from pathlib import Path

    from harmonizer import launch, training
    from tests import test_resume

    root = Path(tempfile.mkdtemp())
    records_dir = root / "records"
    records_dir.mkdir()
    test_resume._write_records(records_dir / "train-00000-of-00001")
    config = training.TrainConfig(
        data_dir=str(records_dir),
        model_dir=str(root / "run"),
        model="small_cnn",
        num_classes=NUM_CLASSES,
        image_size=IMAGE_SIZE,
        batch_size=4,
        epochs=1.0,
        steps_per_epoch=2,
        warmup_epochs=0.5,
        learning_rate=0.05,
        deterministic=True,
        export=False,
    )
    options = launch.LaunchOptions(
        strategy="mirrored", mixup_alpha=0.2, checkpoint_every=2, sync_batch_norm=True
    )
    starts = [launch.run(config, options)["resumed_from_step"]]
    longer = dataclasses.replace(config, epochs=2.0)
    starts.append(launch.run(longer, options)["resumed_from_step"])
    return starts


@pytest.fixture(scope="module")
def two_replica_result():
    completed = subprocess.run(
        [sys.executable, "-c", "from tests import test_distribute as t; t.worker()"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_mirrored_runs_two_replicas(two_replica_result):
    assert two_replica_result["replicas"] == 2


def test_mirrored_launch_resumes_from_checkpoint(two_replica_result):
    """Restoring optimizer slots on two replicas: the extended run starts at step 2."""
    assert two_replica_result["resumed_from"] == [0, 2]


@pytest.mark.parametrize("name", LOGGED)
def test_mirrored_logs_match_single(two_replica_result, name):
    single_logs, _ = two_replica_result["single"]
    mirrored_logs, _ = two_replica_result["mirrored"]
    np.testing.assert_allclose(mirrored_logs[name], single_logs[name], rtol=1e-5, atol=1e-7)


def test_mirrored_gradients_match_single(two_replica_result):
    _, single_gradients = two_replica_result["single"]
    _, mirrored_gradients = two_replica_result["mirrored"]
    assert len(single_gradients) == len(mirrored_gradients)
    for single, mirrored in zip(single_gradients, mirrored_gradients, strict=True):
        single = np.asarray(single)
        scale = np.abs(single).max()
        assert scale > 0
        np.testing.assert_allclose(np.asarray(mirrored), single, rtol=0, atol=1e-4 * scale)


def test_select_strategy_defaults_to_default():
    strategy = distribute.select_strategy("auto", environ={})
    assert strategy is tf.distribute.get_strategy()


@pytest.mark.parametrize("bad", ["gpu", "", "Mirrored"])
def test_select_strategy_rejects_unknown_name(bad):
    with pytest.raises(ValueError, match="Unknown strategy"):
        distribute.select_strategy(bad, environ={})


def test_select_strategy_tpu_needs_name():
    with pytest.raises(ValueError, match="--tpu=local"):
        distribute.select_strategy("tpu", environ={})


def test_select_strategy_rejects_bad_tf_config():
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.select_strategy("auto", environ={"TF_CONFIG": "{not json"})


@pytest.mark.parametrize(("batch", "replicas", "expected"), [(512, 8, 64), (8, 2, 4), (3, 1, 3)])
def test_per_replica_batch_size(batch, replicas, expected):
    strategy = type("FakeStrategy", (), {"num_replicas_in_sync": replicas})()
    assert distribute.per_replica_batch_size(batch, strategy) == expected


@pytest.mark.parametrize(("batch", "replicas"), [(6, 4), (0, 1)])
def test_per_replica_batch_size_rejects_uneven(batch, replicas):
    strategy = type("FakeStrategy", (), {"num_replicas_in_sync": replicas})()
    with pytest.raises(ValueError, match="multiple of"):
        distribute.per_replica_batch_size(batch, strategy)


def test_set_precision_rejects_float16():
    with pytest.raises(ValueError, match="float16"):
        distribute.set_precision("float16")


def test_fit_keeps_trainable_variable_order():
    """A fit step must not reorder variables, or optimizer slots restore into the wrong ones."""
    import keras

    from harmonizer import model as hmodel
    from harmonizer import zoo

    backbone = zoo.build("small_cnn", num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, widths=(4,))
    harmonizer = hmodel.Harmonizer(backbone, harmonization_weight=1.0, weight_decay=1e-3)
    harmonizer.compile(optimizer=keras.optimizers.SGD(0.1), run_eagerly=True)
    before = [v.path for v in harmonizer.trainable_variables]
    harmonizer.fit(tf.data.Dataset.from_tensors(_batch()), verbose=0)
    assert [v.path for v in harmonizer.trainable_variables] == before


def test_bfloat16_harmonized_step_keeps_float32_losses():
    """Under mixed_bfloat16 the weights, statistics, logits and losses stay float32."""
    import keras

    from harmonizer import layers as hlayers
    from harmonizer import model as hmodel
    from harmonizer import zoo

    try:
        assert distribute.set_precision("bfloat16") == "mixed_bfloat16"
        backbone = zoo.build("small_cnn", num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)
        harmonizer = hmodel.Harmonizer(backbone, harmonization_weight=1.0, weight_decay=1e-4)
        harmonizer.compile(optimizer=keras.optimizers.SGD(0.01), run_eagerly=True)
        logs = harmonizer.fit(tf.data.Dataset.from_tensors(_batch()), verbose=0).history
    finally:
        distribute.set_precision("float32")

    assert backbone.get_layer(zoo.PREPROCESSING_LAYER_NAME).compute_dtype == "float32"
    inner = backbone.layers[-1]
    norms = [layer for layer in inner.layers if isinstance(layer, hlayers.ExactBatchNormalization)]
    assert norms
    assert all(layer.compute_dtype == "bfloat16" for layer in norms)
    assert all(layer.moving_variance.dtype == "float32" for layer in norms)
    assert all(v.dtype == "float32" for v in backbone.trainable_variables)
    for name in ("loss", "cross_entropy", "harmonization"):
        assert np.isfinite(logs[name][-1]), name
    assert logs["harmonization"][-1] > 0
