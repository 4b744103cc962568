"""Mixup (Zhang et al., 2018) of images, labels and feature-importance maps.

Each example ``i`` of a batch is mixed with example ``perm[i]`` of the same batch, ``perm`` a
random permutation, with its own weight ``lam[i] ~ Beta(alpha, alpha)``:

    image = lam * image[i] + (1 - lam) * image[perm[i]]
    label = lam * one_hot(label[i]) + (1 - lam) * one_hot(label[perm[i]])
    map   = lam * map[i] + (1 - lam) * map[perm[i]]

The images, labels and maps use the same permutation and the same weights.

Has-map flag: an example without a map carries an all-zero placeholder, not a map that says
"nothing is important", so mixing it into a real map would train the saliency towards a map
that no one drew. A mixed example therefore keeps a map only when both of its sources have
one: ``has_map = has_map[i] * has_map[perm[i]]``, and the map of an example whose flag drops
to 0 is set to zeros. Mixed examples without a map still contribute their cross-entropy.

Pairing: with a uniform permutation a fraction ``p`` of mapped examples would keep only ``p**2``
mapped after mixing (ClickMe maps cover about 15% of ImageNet, so 2%). By default
(``stratify_by_map=True``) the permutation therefore pairs mapped examples with mapped ones
and unmapped with unmapped, uniformly at random within each group: the mapped fraction is
unchanged and every mixed map is the blend of two real maps. ``stratify_by_map=False`` draws a
uniform permutation, and the rule above decides the flags.

Randomness is stateless: the weights and the permutation are a function of a ``[2]`` seed, and
``mixup_dataset`` derives that seed from the batch index, so a resumed run that skips ``n``
batches sees the same mixing as an uninterrupted one.
"""

from __future__ import annotations

import tensorflow as tf

Features = dict[str, tf.Tensor]


def sample_beta(shape, alpha: float, seed: tf.Tensor, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """Draw ``Beta(alpha, alpha)`` samples statelessly as ``X / (X + Y)``, X, Y ~ Gamma(alpha).

    Args:
        shape: Output shape.
        alpha: Concentration of both Gamma draws, > 0.
        seed: int32 or int64 tensor of shape ``[2]``.
        dtype: Floating dtype of the result.

    Returns:
        Samples in [0, 1] of ``shape``.
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got alpha={alpha}.")
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    x = tf.random.stateless_gamma(shape, seed=seeds[0], alpha=alpha, dtype=dtype)
    y = tf.random.stateless_gamma(shape, seed=seeds[1], alpha=alpha, dtype=dtype)
    # Both draws can underflow to 0 for a small alpha; such a draw is an even mix.
    total = x + y
    return tf.where(total > 0, tf.math.divide_no_nan(x, total), tf.constant(0.5, dtype))


def _as_one_hot(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    if labels.shape.rank == 1:
        return tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
    if labels.shape.rank == 2:
        if labels.shape[-1] is not None and labels.shape[-1] != num_classes:
            raise ValueError(
                f"Soft labels have {labels.shape[-1]} classes but num_classes={num_classes}; "
                "pass the number of classes of the labels."
            )
        return tf.cast(labels, tf.float32)
    raise ValueError(
        f"labels must be integer classes [batch] or soft labels [batch, classes], got shape "
        f"{labels.shape}."
    )


def mixing_permutation(has_map: tf.Tensor, seed: tf.Tensor, stratify_by_map: bool) -> tf.Tensor:
    """Return a random permutation of the batch, within has-map groups when stratified.

    Two independent random orders that list the unmapped examples before the mapped ones have
    the same group at every position, so pairing position k of one with position k of the
    other permutes uniformly within each group.
    """
    batch_size = tf.shape(has_map)[0]
    first_seed, second_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    group = tf.cast(has_map > 0, tf.float32) if stratify_by_map else tf.zeros([batch_size])
    first = tf.argsort(group + tf.random.stateless_uniform([batch_size], seed=first_seed))
    second = tf.argsort(group + tf.random.stateless_uniform([batch_size], seed=second_seed))
    return tf.scatter_nd(first[:, None], second, [batch_size])


def mixup_batch(
    features: Features,
    labels: tf.Tensor,
    alpha: float,
    num_classes: int,
    seed: tf.Tensor,
    stratify_by_map: bool = True,
) -> tuple[Features, tf.Tensor]:
    """Mix a batch with a permutation of itself.

    Args:
        features: ``{"image": [B, H, W, 3], "map": [B, H, W], "has_map": [B]}``; other keys
            are passed through unchanged.
        labels: Integer classes ``[B]`` or soft labels ``[B, num_classes]``.
        alpha: Mixup concentration; ``lam ~ Beta(alpha, alpha)``.
        num_classes: Number of classes of the one-hot labels.
        seed: ``[2]`` integer tensor for the stateless sampling.
        stratify_by_map: Pair mapped examples only with mapped ones (see the module docstring).

    Returns:
        ``(features, labels)`` with mixed images and maps, the has-map rule of the module
        docstring, and float32 soft labels ``[B, num_classes]``.

    Raises:
        ValueError: On a missing feature key, bad labels rank or ``alpha <= 0``.
    """
    missing = {"image", "map", "has_map"} - set(features)
    if missing:
        raise ValueError(f"mixup needs features {sorted(missing)}; got keys {sorted(features)}.")

    images = tf.cast(features["image"], tf.float32)
    maps = tf.cast(features["map"], tf.float32)
    has_map = tf.cast(features["has_map"], tf.float32)
    targets = _as_one_hot(labels, num_classes)
    batch_size = tf.shape(images)[0]

    weight_seed, permutation_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    lam = sample_beta([batch_size], alpha, weight_seed)
    permutation = mixing_permutation(has_map, permutation_seed, stratify_by_map)

    def mix(values: tf.Tensor) -> tf.Tensor:
        weight = tf.reshape(lam, [-1] + [1] * (values.shape.rank - 1))
        return weight * values + (1.0 - weight) * tf.gather(values, permutation)

    mixed_has_map = has_map * tf.gather(has_map, permutation)
    mixed_maps = mix(maps) * tf.reshape(mixed_has_map, [-1, 1, 1])

    mixed = dict(features)
    mixed["image"] = mix(images)
    mixed["map"] = mixed_maps
    mixed["has_map"] = mixed_has_map
    return mixed, mix(targets)


def mixup_dataset(
    dataset: tf.data.Dataset,
    alpha: float,
    num_classes: int,
    seed: int,
    stratify_by_map: bool = True,
) -> tf.data.Dataset:
    """Apply ``mixup_batch`` to every batch, seeded by ``(seed, batch index)``.

    Args:
        dataset: Batched ``(features, labels)`` pairs.
        alpha: Mixup concentration, > 0.
        num_classes: Number of classes.
        seed: Base seed of the run.
        stratify_by_map: Pair mapped examples only with mapped ones.

    Returns:
        The mixed dataset, deterministic given ``seed`` and the order of the input batches.
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got alpha={alpha}; omit mixup to disable it.")

    def mix(index, batch):
        features, labels = batch
        batch_seed = tf.stack([tf.constant(seed, tf.int64), index])
        return mixup_batch(features, labels, alpha, num_classes, batch_seed, stratify_by_map)

    return dataset.enumerate().map(mix, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
