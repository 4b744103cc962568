"""TensorFlow Datasets metadata for a finished build, so `tfds` can read the shards directly.

`write_tfds_metadata` writes `dataset_info.json` and `features.json` next to the shards with
`tfds.folder_dataset.write_metadata`. Afterwards

    builder = tfds.builder_from_directory(output_dir)
    dataset = builder.as_dataset(split="train")

yields nested dicts (`image/encoded` decoded to uint8 [H, W, 3], `image/class/label` as a
`ClassLabel` over the 1000 synsets, `map/encoded` kept as PNG bytes because examples without a
map hold empty bytes). TFDS flattens nested feature dicts with `/`, which is why these features
read the `harmonizer.records` keys unchanged. Split sizes come from the manifest, so no shard is
read again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tfrecords import labels

DATASET_NAME = "harmonizer_imagenet"
FILENAME_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}"


def features() -> tfds.features.FeaturesDict:
    """Return the TFDS features whose flattened keys are the `harmonizer.records` schema."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.FeaturesDict(
                {
                    "encoded": tfds.features.Image(shape=(None, None, 3)),
                    "class": tfds.features.FeaturesDict(
                        {"label": tfds.features.ClassLabel(names=list(labels.synsets()))}
                    ),
                    "filename": tfds.features.Text(),
                }
            ),
            "map": tfds.features.FeaturesDict(
                {
                    "encoded": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "has_map": tfds.features.Tensor(shape=(), dtype=np.int64),
                    "source": tfds.features.Text(),
                }
            ),
        }
    )


def write_tfds_metadata(output_dir: str, manifest: dict[str, Any]) -> None:
    """Write `dataset_info.json` and `features.json` for the shards listed in `manifest`.

    Raises:
        ValueError: if the manifest is not complete.
    """
    if not manifest.get("complete"):
        raise ValueError(
            f"the build in {output_dir} is not complete; finish it with tfrecords.build first"
        )
    template = tfds.core.ShardedFileTemplate(
        data_dir=tfds.core.Path(output_dir),
        template=FILENAME_TEMPLATE,
        dataset_name=DATASET_NAME,
        filetype_suffix="tfrecord",
    )
    split_infos = [
        tfds.core.SplitInfo(
            name=split,
            shard_lengths=[entry["num_examples"] for entry in summary["shards"]],
            num_bytes=sum(entry["bytes"] for entry in summary["shards"]),
            filename_template=template.replace(split=split),
        )
        for split, summary in manifest["splits"].items()
    ]
    tfds.folder_dataset.write_metadata(
        data_dir=output_dir,
        features=features(),
        split_infos=split_infos,
        filename_template=template,
        check_data=False,
        description=(
            "ImageNet-layout images with optional feature-importance maps, written by "
            "tfrecords.build; counts, skips and checksums are in manifest.json."
        ),
    )
