"""Choice of the `tf.distribute` strategy and of the precision policy.

``select_strategy`` returns, in order of precedence:

* ``TPUStrategy`` when a TPU name is given (``"local"`` on a TPU VM, or the TPU node's name),
* ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` describes more than one worker,
* ``MirroredStrategy`` when more than one GPU is visible,
* the default strategy otherwise.

``strategy="mirrored"`` forces ``MirroredStrategy`` over all GPUs, or over all logical CPU
devices when there is no GPU; with ``split_cpu`` that runs data parallelism on one CPU, which
the tests use to compare one replica with two.
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf
from absl import logging

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
TF_CONFIG_ENV = "TF_CONFIG"


def split_cpu(num_devices: int) -> None:
    """Split the first physical CPU into ``num_devices`` logical devices.

    Must run before TensorFlow initializes its devices (before any op runs).

    Raises:
        ValueError: When ``num_devices < 1``.
        RuntimeError: When TensorFlow has already initialized its devices.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
    )


def _num_workers(tf_config: str | None) -> int:
    if not tf_config:
        return 0
    try:
        cluster = json.loads(tf_config).get("cluster", {})
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(
            f"{TF_CONFIG_ENV} is not a JSON object with a 'cluster' key: {tf_config!r}; fix or "
            "unset it."
        ) from error
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def _tpu_strategy(tpu: str) -> tf.distribute.Strategy:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if tpu != "local":
        tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _mirrored_strategy() -> tf.distribute.Strategy:
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


def select_strategy(
    strategy: str = "auto", tpu: str | None = None, environ: dict[str, str] | None = None
) -> tf.distribute.Strategy:
    """Return the distribution strategy for this process.

    Args:
        strategy: One of ``STRATEGIES``. ``"auto"`` follows the order in the module docstring.
        tpu: TPU name for ``TPUClusterResolver``: ``"local"`` on a TPU VM. Required for
            ``strategy="tpu"``, and selects the TPU under ``"auto"``.
        environ: Environment to read ``TF_CONFIG`` from; defaults to ``os.environ``.

    Returns:
        The strategy. Build the model and optimizer inside its ``scope()``.

    Raises:
        ValueError: On an unknown strategy, ``"tpu"`` without a TPU name, or an invalid
            ``TF_CONFIG``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy={strategy!r}; use one of {STRATEGIES}.")
    environ = os.environ if environ is None else environ
    num_workers = _num_workers(environ.get(TF_CONFIG_ENV))

    if strategy == "tpu" and not tpu:
        raise ValueError("strategy='tpu' needs a TPU name: pass --tpu=local on a TPU VM.")
    if strategy == "tpu" or (strategy == "auto" and tpu):
        chosen = _tpu_strategy(tpu)
    elif strategy == "multi_worker" or (strategy == "auto" and num_workers > 1):
        chosen = tf.distribute.MultiWorkerMirroredStrategy()
    elif strategy == "mirrored" or (
        strategy == "auto" and len(tf.config.list_logical_devices("GPU")) > 1
    ):
        chosen = _mirrored_strategy()
    else:
        chosen = tf.distribute.get_strategy()

    logging.info(
        "Using %s with %d replicas in sync.",
        type(chosen).__name__,
        chosen.num_replicas_in_sync,
    )
    return chosen


def per_replica_batch_size(global_batch_size: int, strategy: tf.distribute.Strategy) -> int:
    """Return the batch size of one replica.

    Raises:
        ValueError: When the global batch does not split evenly over the replicas.
    """
    replicas = strategy.num_replicas_in_sync
    if global_batch_size < 1 or global_batch_size % replicas:
        raise ValueError(
            f"The global batch size {global_batch_size} must be a positive multiple of the "
            f"{replicas} replicas; change --batch_size."
        )
    return global_batch_size // replicas


def set_precision(precision: str) -> str:
    """Set the global Keras dtype policy for ``precision`` and return the policy name.

    ``"bfloat16"`` selects ``mixed_bfloat16``: weights stay float32, layers compute in
    bfloat16. The zoo's preprocessing layer, the normalization statistics and the losses stay
    float32, and ``Harmonizer`` casts the logits to float32 before the saliency, so the maps
    and losses are float32 tensors. Call before building the model.

    Raises:
        ValueError: On a precision other than ``float32`` and ``bfloat16``.
    """
    if precision not in PRECISIONS:
        raise ValueError(
            f"Unknown precision={precision!r}; use one of {sorted(PRECISIONS)} (float16 needs "
            "loss scaling and is not supported)."
        )
    policy = PRECISIONS[precision]
    keras.mixed_precision.set_global_policy(policy)
    return policy
