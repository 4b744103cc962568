"""The build manifest (`manifest.json` next to the shards) and shard checksums.

The manifest contains the build arguments, a digest of the plan (which file goes to which shard
and position), per split the counts per class and with maps and one entry per shard (examples,
bytes, checksum), the skipped files and the unused maps with reasons, and the ClickMe join
report. It contains no times or host names, so an interrupted and resumed build ends with the same
manifest as an uninterrupted one. It is rewritten (to a temporary name, then renamed) after each
finished shard, which is what a rerun resumes from.

Shard checksum: SHA-256 over the serialized examples in file order, each preceded by its length
as 8 little-endian bytes. It is computed while writing, so no shard is read back, and `verify`
recomputes it from the records (the TFRecord framing has its own CRCs, checked by the reader).
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

MANIFEST_NAME = "manifest.json"
# The list of unmatched ClickMe examples can be long, so it is written once, next to the
# manifest, instead of with every rewrite of the manifest.
CLICKME_UNMATCHED_NAME = "clickme_unmatched.json"
FORMAT_VERSION = 1
TEMPORARY_SUFFIX = ".tmp"


def _gfile():
    import tensorflow as tf  # Imported on use: worker processes import this package without TF.

    return tf.io.gfile


def shard_name(split: str, index: int, num_shards: int) -> str:
    """Return the shard file name `<split>-%05d-of-%05d`."""
    return f"{split}-{index:05d}-of-{num_shards:05d}"


class RecordChecksum:
    """Running checksum of a shard's serialized examples (see the module docstring)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.count = 0

    def update(self, serialized: bytes) -> None:
        self._hash.update(struct.pack("<Q", len(serialized)))
        self._hash.update(serialized)
        self.count += 1

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def read_manifest(output_dir: str) -> dict[str, Any] | None:
    """Return the manifest in `output_dir`, or None when there is none."""
    gfile = _gfile()
    path = f"{output_dir.rstrip('/')}/{MANIFEST_NAME}"
    if not gfile.exists(path):
        return None
    with gfile.GFile(path, "r") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); delete it, or pass --overwrite to rebuild"
        ) from error


def write_json(output_dir: str, name: str, content: Any) -> None:
    """Write `content` as JSON to a temporary name, then rename it over `output_dir/name`."""
    gfile = _gfile()
    path = f"{output_dir.rstrip('/')}/{name}"
    temporary = path + TEMPORARY_SUFFIX
    with gfile.GFile(temporary, "w") as f:
        f.write(json.dumps(content, indent=1, sort_keys=True) + "\n")
    gfile.rename(temporary, path, overwrite=True)


def write_manifest(output_dir: str, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically (see `write_json`)."""
    write_json(output_dir, MANIFEST_NAME, manifest)
