"""Listing of the input tree and the map files, through `tf.io.gfile` (local paths or gs://).

Accepted layouts under `input_dir/<split>/`:

* `<synset>/<any name>.JPEG`: the ImageNet training layout, also used for a `val/` tree;
* `ILSVRC2012_val_XXXXXXXX.JPEG` directly in the split folder: the flat validation layout,
  labelled from `validation_labels.txt` of tensorflow-datasets.

Map files are found anywhere under `maps_dir/<split>/` and joined to images by file stem.
"""

from __future__ import annotations

import dataclasses
import posixpath

from tfrecords import labels
from tfrecords.maps import MAP_SUFFIXES

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _gfile():
    import tensorflow as tf  # Imported on use: worker processes import this package without TF.

    return tf.io.gfile


@dataclasses.dataclass(frozen=True)
class SourceImage:
    """One image file of the input tree.

    Attributes:
        split: split folder it was found in.
        path: full path, as given to `tf.io.gfile`.
        relative: path relative to the input folder (used in reports and the manifest).
        label: 0-based ImageNet label.
    """

    split: str
    path: str
    relative: str
    label: int

    @property
    def filename(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.filename)[0]


@dataclasses.dataclass(frozen=True, order=True)
class Skip:
    """A file and why it is not written (or, in the manifest's `converted` list, what it was
    converted from)."""

    split: str
    file: str
    reason: str


def _suffix(name: str) -> str:
    return posixpath.splitext(name)[1].lower()


def list_split(input_dir: str, split: str) -> tuple[list[SourceImage], list[Skip]]:
    """List the images of one split folder, sorted by path, and the files that cannot be used.

    Raises:
        FileNotFoundError: if `input_dir/split` is not a folder.
    """
    gfile = _gfile()
    split_dir = posixpath.join(input_dir, split)
    if not gfile.isdir(split_dir):
        raise FileNotFoundError(
            f"split folder {split_dir!r} not found; --input_dir must contain one folder per "
            f"name in --splits"
        )
    sources: list[SourceImage] = []
    skips: list[Skip] = []
    synset_labels = labels.synset_to_label()

    for entry in sorted(name.rstrip("/") for name in gfile.listdir(split_dir)):
        entry_path = posixpath.join(split_dir, entry)
        if not gfile.isdir(entry_path):
            relative = f"{split}/{entry}"
            label = labels.validation_label(posixpath.splitext(entry)[0])
            if label is None or _suffix(entry) not in IMAGE_SUFFIXES:
                reason = (
                    "file directly in the split folder is neither an ILSVRC2012_val_XXXXXXXX "
                    "image nor inside a synset folder"
                )
                skips.append(Skip(split, relative, reason))
            else:
                sources.append(SourceImage(split, entry_path, relative, label))
            continue

        label = synset_labels.get(entry)
        for name in sorted(n.rstrip("/") for n in gfile.listdir(entry_path)):
            relative = f"{split}/{entry}/{name}"
            path = posixpath.join(entry_path, name)
            if label is None:
                skips.append(Skip(split, relative, f"folder {entry!r} is not an ImageNet synset"))
            elif gfile.isdir(path):
                skips.append(Skip(split, relative, "nested folder inside a synset folder"))
            elif _suffix(name) not in IMAGE_SUFFIXES:
                skips.append(
                    Skip(split, relative, f"file name does not end in one of {IMAGE_SUFFIXES}")
                )
            else:
                sources.append(SourceImage(split, path, relative, label))
    return sources, skips


@dataclasses.dataclass(frozen=True, order=True)
class MapIssue:
    """A map file that is not used (the image, if any, is written without a map), and why."""

    split: str
    map: str
    reason: str


def index_maps(maps_dir: str, split: str) -> tuple[dict[str, str], list[MapIssue]]:
    """Find the map files of one split, keyed by file stem.

    Returns:
        The map path of each stem that has exactly one map file, and the files left out (a
        stem with two map files, a file with another suffix). A split without a folder under
        `maps_dir` has no maps.
    """
    gfile = _gfile()
    root = posixpath.join(maps_dir, split)
    if not gfile.isdir(root):
        return {}, []
    found: dict[str, list[str]] = {}
    issues: list[MapIssue] = []
    for directory, _, filenames in gfile.walk(root):
        for name in filenames:
            path = posixpath.join(directory, name)
            relative = relative_map(path, maps_dir)
            if _suffix(name) not in MAP_SUFFIXES:
                reason = f"map file name does not end in one of {MAP_SUFFIXES}"
                issues.append(MapIssue(split, relative, reason))
                continue
            found.setdefault(posixpath.splitext(name)[0], []).append(path)

    unique = {}
    for stem, paths in sorted(found.items()):
        if len(paths) == 1:
            unique[stem] = paths[0]
            continue
        for path in sorted(paths):
            reason = f"{len(paths)} map files share the stem {stem!r}; none is used"
            issues.append(MapIssue(split, relative_map(path, maps_dir), reason))
    return unique, sorted(issues)


def relative_map(path: str, maps_dir: str) -> str:
    """Return `path` relative to `maps_dir` for reports."""
    prefix = maps_dir.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path
