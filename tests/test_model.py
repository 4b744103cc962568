"""The Harmonizer wrapper: real fit on real TFRecords, loss parts, export and reload."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from harmonizer import data, export, losses, saliency, zoo
from harmonizer.model import Harmonizer

IMAGE_SIZE = 64
NUM_CLASSES = 1000


def compiled(harmonization_weight: float, learning_rate: float = 0.02, seed: int = 0):
    keras.utils.set_random_seed(seed)
    backbone = zoo.build("small_cnn", num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)
    model = Harmonizer(backbone, harmonization_weight=harmonization_weight, weight_decay=1e-4)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9))
    return model


def fixed_batch(tiny_records: str):
    config = data.PipelineConfig(
        f"{tiny_records}/train-*", 16, IMAGE_SIZE, training=True, seed=3, deterministic=True
    )
    return next(iter(data.build_dataset(config)))


def harmonization_on(model: Harmonizer, batch) -> float:
    """Return the harmonization term of a batch with BatchNorm in training mode, as in a step."""
    features, labels = batch
    gradients, _ = saliency.input_gradients(
        model.backbone, features["image"], labels, training=True
    )
    saliency_map = saliency.reduce_saliency(gradients, saliency.SIGNED_MEAN)
    return float(losses.harmonization_loss(saliency_map, features["map"], features["has_map"]))


def test_fit_lowers_harmonization_loss(tiny_records):
    model = compiled(harmonization_weight=1.0)
    batch = fixed_batch(tiny_records)
    before = harmonization_on(model, batch)
    train = data.build_dataset(
        data.PipelineConfig(f"{tiny_records}/train-*", 16, IMAGE_SIZE, training=True, seed=0)
    )
    history = model.fit(train, epochs=4, steps_per_epoch=10, verbose=0)
    after = harmonization_on(model, batch)
    assert after < 0.8 * before, (before, after)
    logged = history.history["harmonization"]
    assert logged[-1] < logged[0]
    for name in ("loss", "cross_entropy", "harmonization", "weight_decay", "accuracy"):
        assert np.all(np.isfinite(history.history[name])), name
        assert history.history[name][-1] != 0.0, f"{name} was never updated"


def test_logged_parts_add_up_to_loss(tiny_records):
    model = compiled(harmonization_weight=2.0)
    logs = model.train_on_batch(*fixed_batch(tiny_records), return_dict=True)
    expected = logs["cross_entropy"] + 2.0 * logs["harmonization"] + logs["weight_decay"]
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)


def test_step_matches_manual_gradient(tiny_records):
    """One train step equals SGD on the gradient of the loss computed by hand."""
    model = compiled(harmonization_weight=1.0, learning_rate=0.1)
    model.optimizer = keras.optimizers.SGD(0.1)
    model.compile(optimizer=model.optimizer)
    features, labels = fixed_batch(tiny_records)
    images = features["image"]
    weights_before = [v.numpy() for v in model.backbone.trainable_variables]
    moving_before = [v.numpy() for v in model.backbone.non_trainable_variables]

    with tf.GradientTape() as tape:
        with tf.GradientTape() as inner:
            inner.watch(images)
            logits = model.backbone(images, training=True)
            target = tf.reduce_sum(logits * tf.one_hot(labels, NUM_CLASSES))
        saliency_map = tf.reduce_mean(inner.gradient(target, images), axis=-1)
        loss = (
            tf.reduce_mean(losses.per_example_cross_entropy(logits, tf.one_hot(labels, 1000)))
            + losses.harmonization_loss(saliency_map, features["map"], features["has_map"])
            + 1e-4 * losses.weight_decay_loss(losses.decayed_weights(model.backbone))
        )
    expected_gradients = tape.gradient(loss, model.backbone.trainable_variables)
    for variable, value in zip(model.backbone.non_trainable_variables, moving_before, strict=True):
        variable.assign(value)

    model.train_on_batch(features, labels)
    for variable, before, gradient in zip(
        model.backbone.trainable_variables, weights_before, expected_gradients, strict=True
    ):
        np.testing.assert_allclose(
            variable.numpy(), before - 0.1 * gradient.numpy(), atol=1e-5, err_msg=variable.path
        )


def test_batch_without_maps_has_zero_harmonization(tiny_records):
    model = compiled(harmonization_weight=1.0)
    features, labels = fixed_batch(tiny_records)
    features = dict(features, has_map=tf.zeros_like(features["has_map"]))
    logs = model.train_on_batch(features, labels, return_dict=True)
    assert logs["harmonization"] == 0.0
    assert np.isfinite(logs["loss"])


def test_baseline_step_trains_cross_entropy_only(tiny_records):
    model = compiled(harmonization_weight=0.0)
    logs = model.train_on_batch(*fixed_batch(tiny_records), return_dict=True)
    assert logs["harmonization"] == 0.0
    assert logs["loss"] == pytest.approx(logs["cross_entropy"] + logs["weight_decay"], rel=1e-5)


def test_evaluate_reports_alignment(tiny_records):
    model = compiled(harmonization_weight=1.0)
    validation = data.build_dataset(
        data.PipelineConfig(f"{tiny_records}/val-*", 8, IMAGE_SIZE, training=False)
    )
    logs = model.evaluate(validation, verbose=0, return_dict=True)
    assert -1.0 / 0.65753 <= logs["alignment"] <= 1.0 / 0.65753
    assert logs["mapped_fraction"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "argument, value, message",
    [
        ("harmonization_weight", -1.0, "harmonization_weight must be >= 0"),
        ("weight_decay", -0.1, "weight_decay must be >= 0"),
        ("label_smoothing", 1.0, r"label_smoothing must be in \[0, 1\)"),
    ],
)
def test_invalid_arguments_rejected(argument, value, message):
    backbone = zoo.build("small_cnn", num_classes=10, image_size=32)
    with pytest.raises(ValueError, match=message):
        Harmonizer(backbone, **{argument: value})


def test_saved_model_reload_gives_same_saliency(tmp_path):
    keras.utils.set_random_seed(1)
    backbone = zoo.build("small_cnn", num_classes=10, image_size=IMAGE_SIZE)
    info = export.export_model(backbone, str(tmp_path / "export"))
    assert info["preprocessing"] == zoo.preprocessing_of("small_cnn")
    images = np.random.default_rng(0).uniform(0, 255, (3, IMAGE_SIZE, IMAGE_SIZE, 3))
    labels = np.array([1, 4, 9])
    expected = saliency.saliency_maps(backbone, images, labels).numpy()
    for loaded in (
        export.load_keras(str(tmp_path / "export")),
        export.load_saved_model(str(tmp_path / "export")),
    ):
        actual = saliency.saliency_maps(loaded, images, labels).numpy()
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-7)
        assert np.abs(actual).max() > 0


def test_load_saved_model_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SavedModel at"):
        export.load_saved_model(str(tmp_path / "absent"))
