r"""Measure `tfrecords.build` throughput with 1 and 2 worker processes in one run.

The input is a train tree of real JPEGs: the 140 vendored photos copied round-robin under new
names until `--num_images` files exist. A JPEG comment segment makes each copy distinct, so the
duplicate check keeps it. The copies of the 41 cut-outs carry their silhouette masks as map
files. Each worker count builds into a fresh folder; the time covers the whole `build` call
(listing, worker start-up, inspection, encoding, writing, manifest).

Usage (run by hand, not a test):
    python -m benchmarks.bench_builder [--num_images=1400] [--workers=1,2] \
        [--max_shorter_side=0] [--work_dir=/tmp/bench_builder]
"""

from __future__ import annotations

import csv
import os
import resource
import shutil
import struct
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags

from tfrecords import build
from tfrecords.make_tiny import SOURCE_DIR

JPEG_COMMENT_MARKER = b"\xff\xfe"


def with_comment(jpeg: bytes, text: str) -> bytes:
    """Return `jpeg` with a comment segment after the start-of-image marker (pixels unchanged)."""
    payload = text.encode("ascii")
    return jpeg[:2] + JPEG_COMMENT_MARKER + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def make_tree(root: Path, num_images: int) -> int:
    """Write `num_images` distinct JPEGs (and maps for cut-out copies); return the map count."""
    with (SOURCE_DIR / "manifest.csv").open(newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda row: row["file"])
    num_maps = 0
    for index in range(num_images):
        row = rows[index % len(rows)]
        source = SOURCE_DIR / row["file"]
        stem = f"{row['synset']}_{index}"
        image_path = root / "train" / row["synset"] / f"{stem}.JPEG"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        image_path.write_bytes(with_comment(source.read_bytes(), f"copy {index}"))
        if row["kind"] == "cutout":
            mask = SOURCE_DIR / "masks" / Path(row["file"]).with_suffix(".png")
            map_path = root / "maps" / "train" / row["synset"] / f"{stem}.png"
            map_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mask, map_path)
            num_maps += 1
    return num_maps


def _cpu_seconds() -> tuple[float, float]:
    """Return user + system CPU seconds of this process and of its finished child processes."""
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (
        self_usage.ru_utime + self_usage.ru_stime,
        children.ru_utime + children.ru_stime,
    )


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command-line flags."""
    flags.DEFINE_integer("num_images", 1400, "Images in the generated train tree.")
    flags.DEFINE_list("workers", ["1", "2"], "Worker counts to time, in order.")
    flags.DEFINE_integer("num_shards", 16, "Shards to write.")
    flags.DEFINE_integer(
        "max_shorter_side", 0, "Passed to the builder; > 0 makes every image re-encode."
    )
    flags.DEFINE_string("work_dir", "", "Scratch folder (default: a new temporary folder).")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    work_dir = Path(FLAGS.work_dir or tempfile.mkdtemp(prefix="bench_builder_"))
    tree = work_dir / "tree"
    if tree.exists():
        shutil.rmtree(tree)
    num_maps = make_tree(tree, FLAGS.num_images)
    # Import TensorFlow and TFDS now: the builder imports them on first use, which would
    # charge several seconds to whichever worker count runs first.
    import tensorflow  # noqa: F401

    from harmonizer import records  # noqa: F401
    from tfrecords import tfds_metadata  # noqa: F401

    print(
        f"tree: {FLAGS.num_images} images ({num_maps} with maps) in {tree}; "
        f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}"
    )

    throughput = {}
    cpu_seconds = {}
    for workers in (int(w) for w in FLAGS.workers):
        output = work_dir / f"records_{workers}"
        if output.exists():
            shutil.rmtree(output)
        config = build.BuildConfig(
            input_dir=str(tree),
            output_dir=str(output),
            splits=("train",),
            num_shards={"train": FLAGS.num_shards},
            maps_dir=str(tree / "maps"),
            max_shorter_side=FLAGS.max_shorter_side,
            num_workers=workers,
            show_progress=False,
        )
        main_before, workers_before = _cpu_seconds()
        start = time.perf_counter()
        manifest = build.build(config)
        seconds = time.perf_counter() - start
        main_after, workers_after = _cpu_seconds()
        main_cpu, workers_cpu = main_after - main_before, workers_after - workers_before
        examples = manifest["totals"]["examples"]
        throughput[workers] = examples / seconds
        cpu_seconds[workers] = (main_cpu, workers_cpu)
        print(
            f"workers={workers}: {examples} examples in {seconds:.2f} s = "
            f"{throughput[workers]:.1f} examples/s; CPU s: main process {main_cpu:.2f}, "
            f"workers {workers_cpu:.2f}; load average after: {os.getloadavg()[0]:.2f}"
        )
    if 1 in throughput and 2 in throughput:
        print(f"speed-up 2 workers / 1 worker (wall clock): {throughput[2] / throughput[1]:.2f}x")
        # On a machine shared with other jobs the wall clock depends on their load. The CPU
        # times bound what 2 idle cores could do: the main process works serially, the two
        # workers share the rest. This is a model, so it is printed as an estimate.
        one = sum(cpu_seconds[1])
        main_cpu, workers_cpu = cpu_seconds[2]
        bound = one / max(main_cpu, (main_cpu + workers_cpu) / 2)
        print(f"estimate for 2 idle cores from CPU times: at most {bound:.2f}x")
    if not FLAGS.work_dir:
        shutil.rmtree(work_dir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
