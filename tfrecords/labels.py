"""ImageNet-1k label tables, read from the files that tensorflow-datasets ships.

Labels are 0-based in sorted-synset order, the order of `labels.txt` in the
`tensorflow_datasets.datasets.imagenet2012` package: `n01440764` is 0. The package also ships
`validation_labels.txt`, whose line i is the synset of `ILSVRC2012_val_<i+1, 8 digits>.JPEG`.
"""

from __future__ import annotations

import functools
import importlib.resources
import re

IMAGENET_PACKAGE = "tensorflow_datasets.datasets.imagenet2012"
VALIDATION_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})$")


def _read_lines(resource: str) -> tuple[str, ...]:
    text = importlib.resources.files(IMAGENET_PACKAGE).joinpath(resource).read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@functools.cache
def synsets() -> tuple[str, ...]:
    """Return the 1000 ImageNet synsets in label order."""
    names = _read_lines("labels.txt")
    if list(names) != sorted(names):
        raise RuntimeError(
            f"labels.txt in {IMAGENET_PACKAGE} is not in sorted order; labels would not be the "
            "standard sorted-synset indices. Reinstall tensorflow-datasets."
        )
    return names


@functools.cache
def synset_to_label() -> dict[str, int]:
    """Return the map from synset (`n01440764`) to its 0-based label."""
    return {synset: index for index, synset in enumerate(synsets())}


@functools.cache
def validation_synsets() -> tuple[str, ...]:
    """Return the synset of each ILSVRC2012 validation image, image 1 first."""
    return _read_lines("validation_labels.txt")


def validation_label(stem: str) -> int | None:
    """Return the label of a flat-layout validation file stem such as `ILSVRC2012_val_00000001`.

    Returns:
        The 0-based label, or None when `stem` is not a validation name or its number is out of
        range.
    """
    match = VALIDATION_NAME.match(stem)
    if match is None:
        return None
    number = int(match.group(1))
    table = validation_synsets()
    if not 1 <= number <= len(table):
        return None
    return synset_to_label()[table[number - 1]]
