r"""Write the tiny ImageNet-layout dataset used by `make demo` and the tests.

The source is the vendored set `data/tiny_imagenet_real/`: 99 ordinary photos and 41 photo
cut-outs on a white background, each cut-out with an object-silhouette mask. A cut-out on white
is too easy (one minus its grayscale already follows its mask closely), so this script pastes
every cut-out, with its mask as alpha, at a random position and scale onto ordinary photos. Each
composite's map is the pasted mask, exact by construction. The masks are object silhouettes, not
human feature-importance data.

Output layout under `--output_dir`:

* `<split>/<synset>/*.JPEG` for each split: composites (label: the cut-out's class) and
  the ordinary photos (unchanged bytes, no map).
* `maps/<split>/<synset>/<stem>.png`: the 8-bit silhouette map of each composite, same size and
  same file stem as its image.
* `composites.csv`: how each composite was made; `manifest.csv`: licences and authors of the
  source photos; `README.md`: the dataset card.

Three splits measure two kinds of generalization. A quarter of the cut-outs is held out of
training. `train` pastes the other cut-outs onto training photos; `val` pastes the same
cut-outs onto validation photos (known objects in unseen scenes, positions and scales);
`val_new_objects` pastes the held-out cut-outs onto validation photos (objects never seen in
training). Ordinary photos without a map go to `train` and `val`. The output is a function of
`--seed` only: a rerun writes the same bytes.

Usage:
    python -m tfrecords.make_tiny --output_dir=runs/tiny/tree [--seed=0]
"""

from __future__ import annotations

import csv
import dataclasses
import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from PIL import Image

SOURCE_DIR = Path(__file__).resolve().parents[1] / "data" / "tiny_imagenet_real"

VAL_FRACTION_CUTOUTS = 0.25
VAL_FRACTION_PHOTOS = 0.20
COMPOSITES_PER_CUTOUT = {"train": 4, "val": 1, "val_new_objects": 2}
# Longer side of the pasted object as a fraction of the background's shorter side.
OBJECT_SCALE_RANGE = (0.35, 0.75)
JPEG_QUALITY = 95
SPLITS = ("train", "val", "val_new_objects")
# The split whose ordinary photos serve as backgrounds, and those that get ordinary photos too.
BACKGROUND_SPLIT = {"train": "train", "val": "val", "val_new_objects": "val"}
PHOTO_SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class SourcePhoto:
    """One row of the vendored manifest."""

    file: str
    synset: str
    class_index: int
    kind: str

    @property
    def stem(self) -> str:
        return Path(self.file).stem


@dataclasses.dataclass(frozen=True)
class TinySummary:
    """Counts of what `make_tiny` wrote, per split."""

    composites: dict[str, int]
    photos: dict[str, int]


def read_source_manifest(source_dir: Path) -> list[SourcePhoto]:
    """Read `manifest.csv` of the vendored photo set, sorted by file name."""
    manifest_path = source_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"source_dir={str(source_dir)!r} has no manifest.csv; point --source_dir at the "
            "vendored data/tiny_imagenet_real folder"
        )
    with manifest_path.open(newline="") as f:
        rows = [
            SourcePhoto(
                file=row["file"],
                synset=row["synset"],
                class_index=int(row["class_index"]),
                kind=row["kind"],
            )
            for row in csv.DictReader(f)
        ]
    return sorted(rows, key=lambda row: row.file)


def split_by_fraction(
    items: Sequence[SourcePhoto], val_fraction: float, rng: np.random.Generator
) -> dict[str, list[SourcePhoto]]:
    """Split `items` at random into train and val, each sorted by file name."""
    order = rng.permutation(len(items))
    num_val = int(round(val_fraction * len(items)))
    val_indices = set(order[:num_val].tolist())
    split = {"train": [], "val": []}
    for index, item in enumerate(items):
        split["val" if index in val_indices else "train"].append(item)
    return split


def _crop_to_mask(cutout: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
    """Crop a cut-out and its mask to the bounding box of the mask's nonzero pixels."""
    box = mask.getbbox()
    if box is None:
        raise ValueError("mask is empty (all zero); the vendored masks should all have an object")
    return cutout.crop(box), mask.crop(box)


def paste_cutout(
    background: Image.Image,
    cutout: Image.Image,
    mask: Image.Image,
    rng: np.random.Generator,
) -> tuple[Image.Image, Image.Image, dict[str, float]]:
    """Paste `cutout` onto `background` with `mask` as alpha at a random position and scale.

    Returns:
        The RGB composite, its 8-bit map (the pasted mask on a zero canvas, background size) and
        the placement (`scale`, `left`, `top`, `width`, `height` of the pasted object).
    """
    cutout, mask = _crop_to_mask(cutout, mask)
    fraction = rng.uniform(*OBJECT_SCALE_RANGE)
    scale = fraction * min(background.size) / max(cutout.size)
    width = max(1, int(round(cutout.width * scale)))
    height = max(1, int(round(cutout.height * scale)))
    cutout = cutout.resize((width, height), Image.Resampling.BICUBIC)
    mask = mask.resize((width, height), Image.Resampling.BILINEAR)
    left = int(rng.integers(0, background.width - width + 1))
    top = int(rng.integers(0, background.height - height + 1))

    composite = background.copy()
    composite.paste(cutout, (left, top), mask)
    map_image = Image.new("L", background.size, 0)
    map_image.paste(mask, (left, top))
    placement = {"scale": scale, "left": left, "top": top, "width": width, "height": height}
    return composite, map_image, placement


def _encode(image: Image.Image, format_name: str) -> bytes:
    buffer = io.BytesIO()
    if format_name == "JPEG":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format=format_name)
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _composite_rows(
    cutouts: Sequence[SourcePhoto],
    backgrounds: Sequence[SourcePhoto],
    split: str,
    source_dir: Path,
    output_dir: Path,
    rng: np.random.Generator,
) -> list[dict[str, object]]:
    """Write the composites of one split and return their `composites.csv` rows."""
    per_cutout = COMPOSITES_PER_CUTOUT[split]
    if len(backgrounds) < per_cutout:
        raise ValueError(
            f"split {split!r} has {len(backgrounds)} background photos but needs "
            f"{per_cutout} distinct ones per cut-out; lower the validation fraction"
        )
    rows = []
    for cutout_row in cutouts:
        cutout = Image.open(source_dir / cutout_row.file).convert("RGB")
        mask_path = source_dir / "masks" / Path(cutout_row.file).with_suffix(".png")
        mask = Image.open(mask_path).convert("L")
        chosen = rng.choice(len(backgrounds), size=per_cutout, replace=False)
        for background_index in sorted(chosen.tolist()):
            background_row = backgrounds[background_index]
            background = Image.open(source_dir / background_row.file).convert("RGB")
            composite, map_image, placement = paste_cutout(background, cutout, mask, rng)
            stem = f"{cutout_row.stem}__on__{background_row.stem}"
            image_path = output_dir / split / cutout_row.synset / f"{stem}.JPEG"
            map_path = output_dir / "maps" / split / cutout_row.synset / f"{stem}.png"
            _write_bytes(image_path, _encode(composite, "JPEG"))
            _write_bytes(map_path, _encode(map_image, "PNG"))
            rows.append(
                {
                    "file": image_path.relative_to(output_dir).as_posix(),
                    "map": map_path.relative_to(output_dir).as_posix(),
                    "split": split,
                    "synset": cutout_row.synset,
                    "class_index": cutout_row.class_index,
                    "cutout": cutout_row.file,
                    "background": background_row.file,
                    "scale": f"{placement['scale']:.4f}",
                    "left": placement["left"],
                    "top": placement["top"],
                    "width": placement["width"],
                    "height": placement["height"],
                }
            )
    return rows


def make_tiny(
    output_dir: str | Path, seed: int = 0, source_dir: str | Path = SOURCE_DIR
) -> TinySummary:
    """Write the tiny train/val tree with silhouette maps under `output_dir`.

    Args:
        output_dir: folder to create; an existing `train`, `val` or `maps` under it is replaced.
        seed: seed of every random choice (splits, backgrounds, placements).
        source_dir: the vendored photo set with `manifest.csv`, `val/` and `masks/`.

    Returns:
        The number of composites and ordinary photos written per split.
    """
    output_dir = Path(output_dir)
    source_dir = Path(source_dir)
    photos = read_source_manifest(source_dir)
    cutouts = [row for row in photos if row.kind == "cutout"]
    plain = [row for row in photos if row.kind == "photo"]
    if not cutouts or not plain:
        raise ValueError(
            f"{source_dir / 'manifest.csv'} must list both kind=cutout and kind=photo rows, "
            f"found {len(cutouts)} cut-outs and {len(plain)} photos"
        )

    for name in (*SPLITS, "maps"):
        if (output_dir / name).exists():
            shutil.rmtree(output_dir / name)
    output_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    object_split = split_by_fraction(cutouts, VAL_FRACTION_CUTOUTS, rng)
    photo_split = split_by_fraction(plain, VAL_FRACTION_PHOTOS, rng)
    cutout_split = {
        "train": object_split["train"],
        "val": object_split["train"],
        "val_new_objects": object_split["val"],
    }

    composite_rows = []
    for split in SPLITS:
        backgrounds = photo_split[BACKGROUND_SPLIT[split]]
        composite_rows += _composite_rows(
            cutout_split[split], backgrounds, split, source_dir, output_dir, rng
        )
        if split not in PHOTO_SPLITS:
            continue
        for row in photo_split[split]:
            target = output_dir / split / row.synset / Path(row.file).name
            _write_bytes(target, (source_dir / row.file).read_bytes())

    with (output_dir / "composites.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(composite_rows[0]))
        writer.writeheader()
        writer.writerows(composite_rows)
    shutil.copyfile(source_dir / "manifest.csv", output_dir / "manifest.csv")

    summary = TinySummary(
        composites={s: sum(r["split"] == s for r in composite_rows) for s in SPLITS},
        photos={s: len(photo_split[s]) if s in PHOTO_SPLITS else 0 for s in SPLITS},
    )
    (output_dir / "README.md").write_text(_dataset_card(summary, cutout_split, seed))
    return summary


def _dataset_card(
    summary: TinySummary, cutout_split: dict[str, list[SourcePhoto]], seed: int
) -> str:
    lines = [
        "# Tiny composite ImageNet-layout set (generated)",
        "",
        f"Generated by `python -m tfrecords.make_tiny --seed={seed}` from the vendored photos in",
        "`data/tiny_imagenet_real/` (licences and authors: `manifest.csv` in this folder).",
        "",
        "| split | composites (with map) | ordinary photos (no map) | cut-outs |",
        "|---|---|---|---|",
    ]
    for split in SPLITS:
        lines.append(
            f"| {split} | {summary.composites[split]} | {summary.photos[split]} "
            f"| {len(cutout_split[split])} |"
        )
    lines += [
        "",
        "Each composite is a photo cut-out pasted, with its silhouette mask as alpha, at a random",
        "position and scale onto an ordinary photo; its label is the cut-out's class and its map",
        "(`maps/<split>/<synset>/<stem>.png`) is the pasted mask. `train` and `val` share their",
        "cut-outs but not their background photos, so `val` shows known objects in unseen scenes;",
        "`val_new_objects` holds the cut-outs left out of training, on validation backgrounds.",
        "`composites.csv` lists the cut-out, background and placement of every composite.",
        "",
        "The maps are object silhouettes, not human feature-importance data. They are a stand-in",
        "that lets the pipeline and the harmonization loss run end to end on real photos.",
        "",
    ]
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command-line flags (only when run as a script, so modules import cleanly)."""
    flags.DEFINE_string("output_dir", None, "Folder to write the tree into.", required=True)
    flags.DEFINE_integer("seed", 0, "Seed of the splits, background choices and placements.")
    flags.DEFINE_string("source_dir", str(SOURCE_DIR), "The vendored photo set to read.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    summary = make_tiny(FLAGS.output_dir, seed=FLAGS.seed, source_dir=FLAGS.source_dir)
    logging.info("wrote %s under %s", summary, FLAGS.output_dir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
