"""Batched agreement metrics between saliency maps and human feature-importance maps.

Every function here is built from TensorFlow ops only, so a whole batch is scored at once on
the device, inside `tf.function`, and under XLA (`jit_compile=True`). Maps are `[B, H, W]` or
`[B, N]`: every axis after the first is flattened into one pixel axis.

Spearman's rho is the Pearson correlation of the two maps' average ranks (ties get the mean of
the ranks they span, as `scipy.stats.rankdata(method="average")`). It is computed in float64 and
returned as float32, so it equals `scipy.stats.spearmanr` to about 1e-7.

Dice and IoU compare the top `fraction` of pixels of each map (10% by default). A map of N
pixels selects exactly `fraction * N` units of membership. Every pixel strictly above the cut-off
value has membership 1, and the pixels tied at the cut-off share what is left equally. So a tie
across the cut-off never depends on pixel order. With memberships `m_a`, `m_b` in [0, 1],
`intersection = sum(min(m_a, m_b))`, `dice = intersection / k` and
`iou = intersection / (2 k - intersection)` with `k = fraction * N`. A map scored against itself
gets 1 on both, whatever its ties.

A constant map (zero variance) has no ranking, so Spearman's rho is undefined: it is returned as
0 with `valid` False. A map containing NaN or infinity is also invalid. Callers average only
the valid entries and report how many were left out.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

# Split-half inter-rater Spearman correlation of the ClickMe human maps, the mean over 1000
# random splits of the participants (Fel et al., NeurIPS 2022, section 4.1, rounded there to 0.66).
HUMAN_CEILING_CLICKME = 0.65753

DEFAULT_TOP_FRACTION = 0.1

_RANK_DTYPE = tf.float64


class MapScores(NamedTuple):
    """Per-example scores of a batch, each of shape [B].

    Attributes:
        spearman: Spearman's rho, float32, 0 where `valid` is False.
        dice: Dice coefficient of the top-fraction pixels, float32, 0 where `valid` is False.
        iou: intersection over union of the top-fraction pixels, float32, 0 where `valid` is
            False.
        valid: bool, True where both maps are finite and neither is constant.
        constant_saliency: bool, True where the first map is constant.
        constant_map: bool, True where the second map is constant.
        nonfinite: bool, True where either map contains NaN or infinity.
    """

    spearman: tf.Tensor
    dice: tf.Tensor
    iou: tf.Tensor
    valid: tf.Tensor
    constant_saliency: tf.Tensor
    constant_map: tf.Tensor
    nonfinite: tf.Tensor


class RankedMaps(NamedTuple):
    """Average ranks of a batch of flattened maps and what follows from them.

    Attributes:
        ranks: float64 [B, N], 1-based average ranks (ascending values get ascending ranks).
        tie_counts: float64 [B, N], the size of the tie group each pixel belongs to.
        constant: bool [B], True where all N pixels tie.
        finite: bool [B], True where every pixel of the map is finite.
    """

    ranks: tf.Tensor
    tie_counts: tf.Tensor
    constant: tf.Tensor
    finite: tf.Tensor


def _flatten_maps(x: tf.Tensor, name: str) -> tf.Tensor:
    """Convert `x` to a floating [B, N] tensor, flattening every axis after the first."""
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        x = tf.cast(x, tf.float64)
    if x.shape.rank is not None and x.shape.rank < 2:
        raise ValueError(
            f"{name} must have shape [B, N] or [B, H, W] (a batch of maps), got shape {x.shape}; "
            "add a batch axis with x[None] to score a single map"
        )
    batch = tf.shape(x)[0]
    return tf.reshape(x, tf.stack([batch, -1]))


def rank_maps(x: tf.Tensor) -> RankedMaps:
    """Rank every map of a batch once, with average ranks for ties.

    One descending `tf.math.top_k` over all pixels sorts each row. Equal neighbours in the
    sorted order form tie groups, and segment reductions over all rows at once give each group's
    first position and size. The group ids are scattered back to the original pixel order.
    Non-finite pixels are ranked as 0 and the row is flagged in `finite`.

    Args:
        x: [B, N] or [B, H, W] maps, any real dtype.

    Returns:
        The ranks, tie-group sizes, constant flags and finite flags of the batch.
    """
    x = _flatten_maps(x, "x")
    finite = tf.reduce_all(tf.math.is_finite(x), axis=1)
    x = tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))

    shape = tf.shape(x)
    batch, size = shape[0], shape[1]
    total = batch * size

    # Descending sort; equal values keep their original order, which the tie rule ignores.
    sorted_values, order = tf.math.top_k(x, k=size, sorted=True)

    # Tie groups: a new group starts at position 0 of each row and where the value changes.
    # Group ids are global (row offset included) so one segment reduction serves every row.
    starts_group = tf.concat(
        [
            tf.ones([batch, 1], tf.bool),
            tf.not_equal(sorted_values[:, 1:], sorted_values[:, :-1]),
        ],
        axis=1,
    )
    group_ids = tf.cumsum(tf.cast(tf.reshape(starts_group, [-1]), tf.int32)) - 1
    positions = tf.tile(tf.range(size)[None, :], tf.stack([batch, 1]))
    flat_positions = tf.reshape(positions, [-1])

    group_first = tf.math.unsorted_segment_min(flat_positions, group_ids, total)
    group_size = tf.math.unsorted_segment_sum(tf.ones_like(flat_positions), group_ids, total)

    # Scatter each pixel's group id from sorted order back to pixel order, then look up the
    # group's first descending position and size.
    row_offsets = tf.range(batch)[:, None] * size
    destinations = tf.reshape(order + row_offsets, [-1, 1])
    pixel_groups = tf.scatter_nd(destinations, group_ids, tf.reshape(total, [1]))
    first = tf.cast(tf.reshape(tf.gather(group_first, pixel_groups), shape), _RANK_DTYPE)
    tie_counts = tf.cast(tf.reshape(tf.gather(group_size, pixel_groups), shape), _RANK_DTYPE)

    # Position p (0-based, descending) has ascending rank N - p. A group spanning descending
    # positions first..first+count-1 therefore spans ascending ranks N-first-count+1..N-first,
    # whose mean is N - first - (count - 1) / 2.
    size_float = tf.cast(size, _RANK_DTYPE)
    ranks = size_float - first - (tie_counts - 1.0) / 2.0

    constant = tf.reduce_all(tf.equal(tie_counts, size_float), axis=1)
    return RankedMaps(ranks=ranks, tie_counts=tie_counts, constant=constant, finite=finite)


def rank_with_ties(x: tf.Tensor) -> tf.Tensor:
    """Return the 1-based average ranks along the last axis of a [B, N] batch.

    Equal to `scipy.stats.rankdata(x, method="average", axis=-1)` for finite input.

    Args:
        x: [B, N] values (higher dimensional maps are flattened after the first axis).

    Returns:
        float64 [B, N] ranks.
    """
    return rank_maps(x).ranks


def _pearson_of_ranks(ranks_a: tf.Tensor, ranks_b: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Return the float64 Pearson correlation of two rank batches and where it is defined."""
    # Average ranks of N pixels always have mean (N + 1) / 2, ties or not.
    size = tf.cast(tf.shape(ranks_a)[1], _RANK_DTYPE)
    mean_rank = (size + 1.0) / 2.0
    centered_a = ranks_a - mean_rank
    centered_b = ranks_b - mean_rank
    covariance = tf.reduce_sum(centered_a * centered_b, axis=1)
    variance_a = tf.reduce_sum(tf.square(centered_a), axis=1)
    variance_b = tf.reduce_sum(tf.square(centered_b), axis=1)
    defined = (variance_a > 0.0) & (variance_b > 0.0)
    denominator = tf.where(defined, tf.sqrt(variance_a * variance_b), tf.ones_like(variance_a))
    rho = tf.where(defined, covariance / denominator, tf.zeros_like(covariance))
    # Rounding can push a perfect correlation a hair outside [-1, 1].
    return tf.clip_by_value(rho, -1.0, 1.0), defined


def top_fraction_membership(ranked: RankedMaps, fraction: float) -> tf.Tensor:
    """Return each pixel's membership in the top `fraction` of its map, in [0, 1].

    The memberships of a map of N pixels sum to exactly `fraction * N`. A tie group spanning
    ascending ranks s..e gets the share of the interval (s - 1, e] that lies above
    `N - fraction * N`, divided equally among its members.

    Args:
        ranked: the output of `rank_maps`.
        fraction: the share of pixels selected, in (0, 1].

    Returns:
        float64 [B, N] memberships.
    """
    _check_fraction(fraction)
    size = tf.cast(tf.shape(ranked.ranks)[1], _RANK_DTYPE)
    selected = fraction * size
    last_rank = ranked.ranks + (ranked.tie_counts - 1.0) / 2.0
    overlap = tf.clip_by_value(last_rank - (size - selected), 0.0, ranked.tie_counts)
    return overlap / ranked.tie_counts


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"fraction must be in (0, 1], got {fraction!r}; use 0.1 for the top 10% of pixels"
        )


def _dice_iou_from_ranks(
    ranked_a: RankedMaps, ranked_b: RankedMaps, fraction: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """Return float64 Dice and IoU of the top-fraction memberships of two ranked batches."""
    membership_a = top_fraction_membership(ranked_a, fraction)
    membership_b = top_fraction_membership(ranked_b, fraction)
    selected = fraction * tf.cast(tf.shape(ranked_a.ranks)[1], _RANK_DTYPE)
    intersection = tf.reduce_sum(tf.minimum(membership_a, membership_b), axis=1)
    dice = intersection / selected
    iou = intersection / (2.0 * selected - intersection)
    return dice, iou


def scores_from_ranks(
    saliency: RankedMaps, maps: RankedMaps, fraction: float = DEFAULT_TOP_FRACTION
) -> MapScores:
    """Compute Spearman's rho, Dice and IoU from maps ranked once by `rank_maps`.

    Args:
        saliency: the ranked model saliency maps.
        maps: the ranked human maps, same shape.
        fraction: the share of pixels Dice and IoU compare.

    Returns:
        Per-example scores; invalid examples score 0 and are flagged.
    """
    _check_fraction(fraction)
    rho, defined = _pearson_of_ranks(saliency.ranks, maps.ranks)
    nonfinite = ~(saliency.finite & maps.finite)
    valid = defined & ~nonfinite

    dice, iou = _dice_iou_from_ranks(saliency, maps, fraction)

    zeros = tf.zeros_like(rho)
    return MapScores(
        spearman=tf.cast(tf.where(valid, rho, zeros), tf.float32),
        dice=tf.cast(tf.where(valid, dice, zeros), tf.float32),
        iou=tf.cast(tf.where(valid, iou, zeros), tf.float32),
        valid=valid,
        constant_saliency=saliency.constant,
        constant_map=maps.constant,
        nonfinite=nonfinite,
    )


def map_scores(
    saliency: tf.Tensor, maps: tf.Tensor, fraction: float = DEFAULT_TOP_FRACTION
) -> MapScores:
    """Rank each map once and score every saliency map against its human map.

    Args:
        saliency: [B, H, W] or [B, N] model saliency maps.
        maps: human maps of the same shape.
        fraction: the share of pixels Dice and IoU compare.

    Returns:
        Per-example Spearman's rho, Dice, IoU and validity flags.

    Raises:
        ValueError: if the two batches differ in shape (when known statically).
    """
    saliency = tf.convert_to_tensor(saliency)
    maps = tf.convert_to_tensor(maps)
    if saliency.shape.is_fully_defined() and maps.shape.is_fully_defined():
        if saliency.shape != maps.shape:
            raise ValueError(
                f"saliency and maps must have the same shape, got {saliency.shape} and "
                f"{maps.shape}; resize the saliency maps to the human maps' resolution first"
            )
    return scores_from_ranks(rank_maps(saliency), rank_maps(maps), fraction)


def spearman(a: tf.Tensor, b: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Return Spearman's rho of each pair of maps and whether it is defined.

    Args:
        a: [B, H, W] or [B, N] maps.
        b: maps of the same shape.

    Returns:
        `(rho, valid)`: float32 [B] correlations (0 where invalid) and bool [B], False where
        either map is constant or not finite.
    """
    ranked_a = rank_maps(a)
    ranked_b = rank_maps(b)
    rho, defined = _pearson_of_ranks(ranked_a.ranks, ranked_b.ranks)
    valid = defined & ranked_a.finite & ranked_b.finite
    return tf.cast(tf.where(valid, rho, tf.zeros_like(rho)), tf.float32), valid


def dice_iou(
    a: tf.Tensor, b: tf.Tensor, fraction: float = DEFAULT_TOP_FRACTION
) -> tuple[tf.Tensor, tf.Tensor]:
    """Return the Dice coefficient and IoU of the top `fraction` pixels of each pair of maps.

    Unlike `map_scores`, a constant map is scored here: all its pixels share the selection
    equally, so its Dice with a map without ties at the cut-off is `fraction`.

    Args:
        a: [B, H, W] or [B, N] maps.
        b: maps of the same shape.
        fraction: the share of pixels compared, in (0, 1].

    Returns:
        `(dice, iou)`, float32 [B] each.
    """
    dice, iou = _dice_iou_from_ranks(rank_maps(a), rank_maps(b), fraction)
    return tf.cast(dice, tf.float32), tf.cast(iou, tf.float32)


def alignment(rho: tf.Tensor, ceiling: float = HUMAN_CEILING_CLICKME) -> tf.Tensor:
    """Return Spearman's rho divided by the human inter-rater ceiling."""
    if not ceiling > 0.0:
        raise ValueError(f"ceiling must be > 0, got {ceiling!r}; ClickMe's is 0.65753")
    return tf.convert_to_tensor(rho) / ceiling
