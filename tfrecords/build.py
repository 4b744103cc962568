r"""Build sharded TFRecords (schema: `harmonizer.records`) from an ImageNet-layout tree and maps.

Stages, all restartable:

1. List `input_dir/<split>/` (synset folders or flat `ILSVRC2012_val_*` files) and the map files
   under `maps_dir/<split>/`, joined to images by file stem.
2. Inspect every image in worker processes: hash it, decode it fully and check its map (size,
   NaN or infinity, constant). CMYK, grayscale and PNG data are marked for conversion. Empty,
   truncated and corrupt files are skipped.
3. Drop byte-identical duplicates within a split (the first path in sorted order is kept),
   optionally join released ClickMe shards to the images (see `tfrecords.clickme`), shuffle each
   split with the seed and cut it into shards.
4. Prepare each shard's examples in worker processes (RGB JPEG, 8-bit PNG map) and write the
   shard in this process to `<name>.tmp`, renamed when complete; `manifest.json` is rewritten
   after every shard. A rerun with the same arguments and input finds the finished shards in the
   manifest and writes only the rest.

Every file found is either written once or listed under `skipped` in the manifest with its
reason; every map file not used is listed under `unused_maps`.

Usage:
    python -m tfrecords.build --input_dir=runs/tiny/tree --maps_dir=runs/tiny/tree/maps \
        --output_dir=runs/tiny/records --splits=train,val --num_shards=train=4,val=2 \
        --map_source=silhouette
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import posixpath
import signal
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from tfrecords import manifest as manifest_lib
from tfrecords import sources as sources_lib
from tfrecords import work

# Shard counts for ImageNet on a TPU v4-8 host: about 1,250 training examples (~140 MB) per
# shard, many more shards than reader threads, and counts divisible by common host counts.
DEFAULT_NUM_SHARDS = {"train": 1024, "val": 128, "validation": 128}
INSPECT_BATCH = 32
MAP_SOURCES_FOR_FILES = ("file", "silhouette")
UNMATCHED_CLICKME_MODES = ("list", "write")
# Test hook: the build process kills itself with SIGKILL after writing this many examples in
# total, so the resume test interrupts a real process at a known point.
KILL_AFTER_EXAMPLES_ENV = "TFRECORDS_TEST_KILL_AFTER_EXAMPLES"


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Arguments of one build.

    Attributes:
        input_dir: folder with one ImageNet-layout folder per split (local or gs://).
        output_dir: folder for the shards and `manifest.json` (local or gs://).
        splits: split folder names to build; each becomes the shard prefix.
        num_shards: number of shards per split.
        maps_dir: folder with `<split>/.../<image stem>.png|.npy` map files, or "" for none.
        map_source: the `map/source` value written for map files (`file` or `silhouette`).
        seed: seed of the shuffle of each split.
        max_shorter_side: images whose shorter side is longer are resized down to it (with
            their maps); 0 keeps every size.
        map_blur_sigma: Gaussian blur, in pixels of the stored map, applied at build time;
            0 stores maps unblurred.
        clickme_files: per split, a glob of released ClickMe TFRecord shards to join.
        unmatched_clickme: `list` reports ClickMe examples without an ImageNet match in the
            manifest; `write` also writes them as examples from their own 256-pixel image.
        clickme_min_correlation: lowest thumbnail correlation accepted as a ClickMe match.
        num_workers: worker processes; 1 runs everything in this process.
        overwrite: rebuild from scratch when `output_dir` contains a build with other
            arguments.
        show_progress: draw progress bars with ETA on stderr.
        tfds_metadata: also write TFDS metadata so `tfds.builder_from_directory(output_dir)`
            reads the shards (see `tfrecords.tfds_metadata`).
    """

    input_dir: str
    output_dir: str
    splits: tuple[str, ...] = ("train", "val")
    num_shards: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_NUM_SHARDS)
    )
    maps_dir: str = ""
    map_source: str = "file"
    seed: int = 0
    max_shorter_side: int = 0
    map_blur_sigma: float = 0.0
    clickme_files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    unmatched_clickme: str = "list"
    clickme_min_correlation: float = 0.9
    num_workers: int = 1
    overwrite: bool = False
    show_progress: bool = True
    tfds_metadata: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first invalid argument."""
        if not self.input_dir or not self.output_dir:
            raise ValueError(
                f"input_dir and output_dir are required, got {self.input_dir!r} and "
                f"{self.output_dir!r}"
            )
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must be distinct, non-empty names, got {self.splits!r}")
        for split in self.splits:
            count = self.num_shards.get(split)
            if count is None or count < 1:
                raise ValueError(
                    f"num_shards needs a count >= 1 for split {split!r}, got {count!r} in "
                    f"{dict(self.num_shards)!r}; pass e.g. --num_shards={split}=16"
                )
        if self.map_source not in MAP_SOURCES_FOR_FILES:
            raise ValueError(
                f"map_source must be one of {MAP_SOURCES_FOR_FILES}, got {self.map_source!r}"
            )
        if self.max_shorter_side < 0 or self.map_blur_sigma < 0:
            raise ValueError(
                f"max_shorter_side and map_blur_sigma must be >= 0, got "
                f"{self.max_shorter_side} and {self.map_blur_sigma}"
            )
        if self.unmatched_clickme not in UNMATCHED_CLICKME_MODES:
            raise ValueError(
                f"unmatched_clickme must be one of {UNMATCHED_CLICKME_MODES}, got "
                f"{self.unmatched_clickme!r}"
            )
        unknown = sorted(set(self.clickme_files) - set(self.splits))
        if unknown:
            raise ValueError(
                f"clickme_files names splits {unknown} that are not in splits={self.splits}"
            )
        if not 0 < self.clickme_min_correlation <= 1:
            raise ValueError(
                f"clickme_min_correlation must be in (0, 1], got {self.clickme_min_correlation}"
            )
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")

    def manifest_arguments(self) -> dict[str, Any]:
        """Return the arguments that decide the output (not where it goes or how fast)."""
        arguments = dataclasses.asdict(self)
        for name in ("output_dir", "num_workers", "overwrite", "show_progress", "tfds_metadata"):
            arguments.pop(name)
        arguments["splits"] = list(self.splits)
        arguments["num_shards"] = {split: self.num_shards[split] for split in self.splits}
        arguments["clickme_files"] = dict(sorted(self.clickme_files.items()))
        return arguments


@dataclasses.dataclass
class Plan:
    """Everything decided before writing: each shard's examples and what was left out."""

    shards: dict[str, list[list[work.ExampleTask]]]
    files_found: dict[str, int]
    skipped: list[sources_lib.Skip]
    converted: list[sources_lib.Skip]
    unused_maps: list[sources_lib.MapIssue]
    clickme_report: dict[str, Any] | None
    digest: str


class _Runner:
    """Maps a function over tasks in this process or in worker processes, with a progress bar.

    A worker that dies (out of memory, a crash in a decoder) makes the build fail with
    `BrokenProcessPool` instead of hanging.
    """

    # Tasks submitted ahead per worker: enough to keep workers busy, few enough that finished
    # shards do not pile up in memory while this process writes.
    TASKS_IN_FLIGHT_PER_WORKER = 2

    def __init__(self, num_workers: int, show_progress: bool) -> None:
        self._show_progress = show_progress
        self._num_workers = num_workers
        self._executor = None
        if num_workers > 1:
            # spawn: workers start clean instead of inheriting TensorFlow's threads by fork.
            self._executor = concurrent.futures.ProcessPoolExecutor(
                num_workers, mp_context=multiprocessing.get_context("spawn")
            )

    def map_unordered(
        self, function: Callable[[Any], Any], tasks: Sequence[Any], description: str, total: int
    ) -> Iterator[Any]:
        progress = tqdm(total=total, desc=description, disable=not self._show_progress)
        with progress:
            for result in self._results(function, tasks):
                progress.update(_size(result))
                yield result

    def _results(self, function: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[Any]:
        if self._executor is None:
            yield from map(function, tasks)
            return
        pending_tasks = iter(tasks)
        in_flight: set[concurrent.futures.Future] = set()
        limit = self._num_workers * self.TASKS_IN_FLIGHT_PER_WORKER
        while True:
            for task in itertools.islice(pending_tasks, limit - len(in_flight)):
                in_flight.add(self._executor.submit(function, task))
            if not in_flight:
                return
            done, in_flight = concurrent.futures.wait(
                in_flight, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in done:
                yield future.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)


def _size(result: Any) -> int:
    """Return how many items a worker result covers (for the progress bar)."""
    if isinstance(result, tuple):
        return len(result[1])
    return len(result)


def _inspect(
    all_sources: list[sources_lib.SourceImage],
    map_paths: list[str],
    want_fingerprint: bool,
    runner: _Runner,
) -> list[work.Inspection]:
    tasks = [
        work.InspectTask(index, source.path, map_path, want_fingerprint)
        for index, (source, map_path) in enumerate(zip(all_sources, map_paths, strict=True))
    ]
    batches = [tasks[i : i + INSPECT_BATCH] for i in range(0, len(tasks), INSPECT_BATCH)]
    inspections: list[work.Inspection | None] = [None] * len(tasks)
    for batch in runner.map_unordered(work.inspect_batch, batches, "inspect", len(tasks)):
        for inspection in batch:
            inspections[inspection.index] = inspection
    return inspections  # type: ignore[return-value]


@dataclasses.dataclass
class Candidate:
    """An image that passed inspection, with its usable map file if any."""

    source: sources_lib.SourceImage
    inspection: work.Inspection
    map_path: str = ""
    map_jpeg: bytes = b""
    map_source: str = "none"
    center_square: bool = False


def _select(
    config: BuildConfig,
    split: str,
    sources: list[sources_lib.SourceImage],
    inspections: list[work.Inspection],
    map_index: dict[str, str],
) -> tuple[list[Candidate], list[sources_lib.Skip], list[sources_lib.MapIssue]]:
    """Keep the good, first-seen images of one split and report the rest."""
    kept: list[Candidate] = []
    skipped: list[sources_lib.Skip] = []
    unused: list[sources_lib.MapIssue] = []
    first_path_of_digest: dict[str, str] = {}
    image_stems = set()
    for source, inspection in zip(sources, inspections, strict=True):
        image_stems.add(source.stem)
        map_path = map_index.get(source.stem, "")
        map_relative = sources_lib.relative_map(map_path, config.maps_dir) if map_path else ""
        if inspection.error:
            skipped.append(sources_lib.Skip(split, source.relative, inspection.error))
            if map_path:
                reason = f"its image {source.relative} is skipped"
                unused.append(sources_lib.MapIssue(split, map_relative, reason))
            continue
        duplicate_of = first_path_of_digest.setdefault(inspection.sha256, source.relative)
        if duplicate_of != source.relative:
            reason = f"duplicate of {duplicate_of} (identical bytes)"
            skipped.append(sources_lib.Skip(split, source.relative, reason))
            if map_path:
                reason = f"its image {source.relative} is a skipped duplicate"
                unused.append(sources_lib.MapIssue(split, map_relative, reason))
            continue
        if map_path and inspection.map_error:
            reason = f"{inspection.map_error}; {source.relative} is written without a map"
            unused.append(sources_lib.MapIssue(split, map_relative, reason))
            map_path = ""
        map_source = config.map_source if map_path else "none"
        kept.append(Candidate(source, inspection, map_path, map_source=map_source))

    for stem, map_path in sorted(map_index.items()):
        if stem not in image_stems:
            reason = f"no image with the stem {stem!r} in split {split!r}"
            map_relative = sources_lib.relative_map(map_path, config.maps_dir)
            unused.append(sources_lib.MapIssue(split, map_relative, reason))
    return kept, skipped, unused


def _task(candidate: Candidate) -> work.ExampleTask:
    inspection = candidate.inspection
    return work.ExampleTask(
        filename=candidate.source.filename,
        label=candidate.source.label,
        width=inspection.width,
        height=inspection.height,
        is_rgb_jpeg=not inspection.note,
        path=candidate.source.path,
        map_path=candidate.map_path,
        map_jpeg=candidate.map_jpeg,
        map_source=candidate.map_source,
        center_square=candidate.center_square,
    )


def _shuffle_into_shards(
    tasks: list[work.ExampleTask], num_shards: int, seed: int, split: str
) -> list[list[work.ExampleTask]]:
    """Shuffle a split (seeded per split name) and cut it into `num_shards` contiguous runs."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode("utf-8"))])
    order = rng.permutation(len(tasks))
    bounds = np.linspace(0, len(tasks), num_shards + 1).round().astype(int)
    return [[tasks[i] for i in order[bounds[k] : bounds[k + 1]]] for k in range(num_shards)]


def _plan_digest(shards: dict[str, list[list[work.ExampleTask]]], sha256: dict[str, str]) -> str:
    """Hash which file (and which content) goes to which shard and position."""
    digest = hashlib.sha256()
    for split in sorted(shards):
        for index, shard in enumerate(shards[split]):
            for task in shard:
                image_id = sha256.get(task.path) or hashlib.sha256(task.image_bytes).hexdigest()
                map_id = task.map_path or hashlib.sha256(task.map_jpeg).hexdigest()
                row = [
                    split,
                    index,
                    task.filename,
                    task.label,
                    image_id,
                    map_id,
                    task.map_source,
                    task.center_square,
                ]
                digest.update(json.dumps(row).encode("utf-8"))
    return digest.hexdigest()


def make_plan(config: BuildConfig, runner: _Runner) -> Plan:
    """List, inspect, select, join and shuffle: decide every shard's examples."""
    split_sources: dict[str, list[sources_lib.SourceImage]] = {}
    map_indexes: dict[str, dict[str, str]] = {}
    skipped: list[sources_lib.Skip] = []
    unused_maps: list[sources_lib.MapIssue] = []
    for split in config.splits:
        sources, skips = sources_lib.list_split(config.input_dir, split)
        split_sources[split] = sources
        skipped += skips
        if config.maps_dir:
            map_indexes[split], issues = sources_lib.index_maps(config.maps_dir, split)
            unused_maps += issues
        else:
            map_indexes[split] = {}
    files_found = {
        split: len(split_sources[split]) + sum(s.split == split for s in skipped)
        for split in config.splits
    }
    for split in config.splits:
        logging.info(
            "split %s: %d files found under %s, %d map files indexed",
            split,
            files_found[split],
            posixpath.join(config.input_dir, split),
            len(map_indexes[split]),
        )

    all_sources = [source for split in config.splits for source in split_sources[split]]
    map_paths = [map_indexes[s.split].get(s.stem, "") for s in all_sources]
    inspections = _inspect(all_sources, map_paths, bool(config.clickme_files), runner)

    candidates: dict[str, list[Candidate]] = {}
    offset = 0
    for split in config.splits:
        count = len(split_sources[split])
        kept, skips, issues = _select(
            config,
            split,
            split_sources[split],
            inspections[offset : offset + count],
            map_indexes[split],
        )
        offset += count
        candidates[split] = kept
        skipped += skips
        unused_maps += issues

    clickme_report = None
    standalone: dict[str, list[work.ExampleTask]] = {split: [] for split in config.splits}
    if config.clickme_files:
        from tfrecords import clickme  # Needs TensorFlow to read the ClickMe shards.

        clickme_report, standalone = clickme.join(config, candidates, runner)

    shards = {}
    for split in config.splits:
        tasks = [_task(candidate) for candidate in candidates[split]] + standalone[split]
        shards[split] = _shuffle_into_shards(tasks, config.num_shards[split], config.seed, split)
    kept = [c for split in config.splits for c in candidates[split]]
    sha256 = {c.source.path: c.inspection.sha256 for c in kept}
    converted = [
        sources_lib.Skip(c.source.split, c.source.relative, f"converted to RGB JPEG from {note}")
        for c in kept
        if (note := c.inspection.note)
    ]
    return Plan(
        shards=shards,
        files_found=files_found,
        skipped=sorted(skipped),
        converted=sorted(converted),
        unused_maps=sorted(unused_maps),
        clickme_report=clickme_report,
        digest=_plan_digest(shards, sha256),
    )


def _split_summary(shards: list[list[work.ExampleTask]]) -> dict[str, Any]:
    per_class = collections.Counter(task.label for shard in shards for task in shard)
    per_source = collections.Counter(task.map_source for shard in shards for task in shard)
    return {
        "num_examples": sum(len(shard) for shard in shards),
        "num_with_map": sum(n for source, n in per_source.items() if source != "none"),
        "examples_per_map_source": dict(sorted(per_source.items())),
        "examples_per_class": {str(label): per_class[label] for label in sorted(per_class)},
        "num_shards": len(shards),
        "shards": [None] * len(shards),
    }


def new_manifest(config: BuildConfig, plan: Plan) -> dict[str, Any]:
    """Return the manifest of a planned build with no shard written yet."""
    num_written = sum(len(shard) for split in plan.shards for shard in plan.shards[split])
    num_standalone = num_written - sum(plan.files_found.values()) + len(plan.skipped)
    return {
        "format_version": manifest_lib.FORMAT_VERSION,
        "complete": False,
        "arguments": config.manifest_arguments(),
        "plan_sha256": plan.digest,
        "totals": {
            "files_found": sum(plan.files_found.values()),
            "files_skipped": len(plan.skipped),
            "files_converted": len(plan.converted),
            "examples": num_written,
            "clickme_standalone_examples": num_standalone,
            "unused_maps": len(plan.unused_maps),
        },
        "splits": {split: _split_summary(plan.shards[split]) for split in config.splits},
        "skipped": [dataclasses.asdict(skip) for skip in plan.skipped],
        "converted": [dataclasses.asdict(row) for row in plan.converted],
        "unused_maps": [dataclasses.asdict(issue) for issue in plan.unused_maps],
        "clickme": _clickme_summary(plan.clickme_report),
    }


def _clickme_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return the ClickMe report for the manifest: counts, with the rows in their own file."""
    if report is None:
        return None
    summary = {key: value for key, value in report.items() if key != "unmatched"}
    summary["num_unmatched"] = len(report["unmatched"])
    summary["unmatched_file"] = manifest_lib.CLICKME_UNMATCHED_NAME
    return summary


def _resume_from(
    config: BuildConfig, manifest: dict[str, Any], existing: dict[str, Any] | None
) -> None:
    """Copy the finished shards of an earlier run of the same plan into `manifest`.

    Raises:
        ValueError: if `existing` belongs to other arguments or input and `overwrite` is off.
    """
    import tensorflow as tf

    if existing is None:
        return
    same = (
        existing.get("arguments") == manifest["arguments"]
        and existing.get("plan_sha256") == manifest["plan_sha256"]
    )
    if not same:
        if not config.overwrite:
            raise ValueError(
                f"output_dir={config.output_dir!r} contains a build with other arguments or other "
                "input files; pass --overwrite to replace it, or choose another --output_dir"
            )
        logging.warning(
            "--overwrite: removing the shards of an earlier build with other arguments in %s",
            config.output_dir,
        )
        for split in existing.get("splits", {}):
            for path in tf.io.gfile.glob(f"{config.output_dir}/{split}-?????-of-?????"):
                tf.io.gfile.remove(path)
        return
    for split, summary in manifest["splits"].items():
        for index, entry in enumerate(existing["splits"][split]["shards"]):
            if entry is None:
                continue
            path = posixpath.join(config.output_dir, entry["file"])
            if tf.io.gfile.exists(path) and tf.io.gfile.stat(path).length == entry["bytes"]:
                summary["shards"][index] = entry


def _kill_switch() -> Callable[[], None]:
    """Return a function to call after each written example (see `KILL_AFTER_EXAMPLES_ENV`)."""
    limit = int(os.environ.get(KILL_AFTER_EXAMPLES_ENV, "0"))
    written = [0]

    def after_example() -> None:
        written[0] += 1
        if limit and written[0] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    return after_example


def write_shard(
    output_dir: str,
    name: str,
    examples: list[work.PreparedExample],
    after_example: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Write one shard to `<name>.tmp`, rename it to `name` and return its manifest entry."""
    import tensorflow as tf

    from harmonizer import records

    final = posixpath.join(output_dir, name)
    temporary = final + manifest_lib.TEMPORARY_SUFFIX
    checksum = manifest_lib.RecordChecksum()
    num_with_map = 0
    with tf.io.TFRecordWriter(temporary) as writer:
        for example in examples:
            record = records.Record(
                image_jpeg=example.image_jpeg,
                label=example.label,
                filename=example.filename,
                map_png=example.map_png,
                map_source=example.map_source,
            )
            # The order of the feature map in serialized bytes varies between processes (it
            # follows string hashing), so re-serialize deterministically: a resumed build must
            # reproduce the checksums of an uninterrupted one.
            serialized = tf.train.Example.FromString(records.serialize(record)).SerializeToString(
                deterministic=True
            )
            writer.write(serialized)
            checksum.update(serialized)
            num_with_map += bool(example.map_png)
            after_example()
    tf.io.gfile.rename(temporary, final, overwrite=True)
    return {
        "file": name,
        "num_examples": checksum.count,
        "num_with_map": num_with_map,
        "sha256": checksum.hexdigest(),
        "bytes": tf.io.gfile.stat(final).length,
    }


def write_plan(config: BuildConfig, plan: Plan, runner: _Runner) -> dict[str, Any]:
    """Write the shards that the manifest in `output_dir` does not list as finished."""
    import tensorflow as tf

    tf.io.gfile.makedirs(config.output_dir)
    manifest = new_manifest(config, plan)
    _resume_from(config, manifest, manifest_lib.read_manifest(config.output_dir))
    for path in tf.io.gfile.glob(f"{config.output_dir}/*{manifest_lib.TEMPORARY_SUFFIX}"):
        tf.io.gfile.remove(path)

    jobs = []
    for split in config.splits:
        for index, entry in enumerate(manifest["splits"][split]["shards"]):
            if entry is None:
                jobs.append(((split, index), plan.shards[split][index]))
    if plan.clickme_report is not None:
        unmatched = plan.clickme_report["unmatched"]
        manifest_lib.write_json(config.output_dir, manifest_lib.CLICKME_UNMATCHED_NAME, unmatched)
    resumed = sum(len(plan.shards[s]) for s in config.splits) - len(jobs)
    if resumed:
        logging.info("resuming: %d shards already finished in %s", resumed, config.output_dir)
    manifest_lib.write_manifest(config.output_dir, manifest)

    prepare = functools.partial(
        work.prepare_shard,
        max_shorter_side=config.max_shorter_side,
        map_blur_sigma=config.map_blur_sigma,
    )
    after_example = _kill_switch()
    total = sum(len(tasks) for _, tasks in jobs)
    for (split, index), examples in runner.map_unordered(prepare, jobs, "write", total):
        name = manifest_lib.shard_name(split, index, config.num_shards[split])
        entry = write_shard(config.output_dir, name, examples, after_example)
        manifest["splits"][split]["shards"][index] = entry
        manifest_lib.write_manifest(config.output_dir, manifest)

    manifest["complete"] = True
    manifest_lib.write_manifest(config.output_dir, manifest)
    if config.tfds_metadata:
        from tfrecords import tfds_metadata  # tensorflow-datasets takes a second to import.

        tfds_metadata.write_tfds_metadata(config.output_dir, manifest)
    return manifest


def build(config: BuildConfig) -> dict[str, Any]:
    """Build (or finish building) the shards and manifest described by `config`.

    Returns:
        The final manifest, as written to `output_dir/manifest.json`.

    Raises:
        ValueError: if an argument is invalid, or `output_dir` contains another build and
            `overwrite` is off.
        FileNotFoundError: if a split folder is missing.
    """
    config.validate()
    import tensorflow as tf  # Imported on use, as in `sources`: workers run without TF.

    if config.maps_dir and not tf.io.gfile.isdir(config.maps_dir):
        raise FileNotFoundError(
            f"maps_dir={config.maps_dir!r} is not a folder; fix the path, or pass "
            "--maps_dir='' to build records without maps"
        )
    runner = _Runner(config.num_workers, config.show_progress)
    try:
        plan = make_plan(config, runner)
        manifest = write_plan(config, plan, runner)
    finally:
        runner.close()
    totals = manifest["totals"]
    for skip in manifest["skipped"]:
        logging.warning("skipped %s/%s: %s", skip["split"], skip["file"], skip["reason"])
    if config.maps_dir and not any(
        counts.get("num_with_map") for counts in manifest["splits"].values()
    ):
        logging.warning(
            "no example got a map from maps_dir=%r: check that it holds <split>/.../<image "
            "stem>.png|.npy files named like the images",
            config.maps_dir,
        )
    logging.info(
        "wrote %d examples to %s; %d of %d files skipped, %d map files unused (reasons in %s)",
        totals["examples"],
        config.output_dir,
        totals["files_skipped"],
        totals["files_found"],
        totals["unused_maps"],
        manifest_lib.MANIFEST_NAME,
    )
    return manifest


def parse_num_shards(text: str, splits: Sequence[str]) -> dict[str, int]:
    """Parse `--num_shards`: one count for every split (`8`) or `split=count` pairs.

    Raises:
        ValueError: if the text is neither form.
    """
    text = text.strip()
    try:
        if "=" not in text:
            return {split: int(text) for split in splits}
        pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
        return {name.strip(): int(count) for name, count in pairs}
    except ValueError as error:
        raise ValueError(
            f"--num_shards must be a count or split=count pairs such as train=1024,val=128, "
            f"got {text!r}"
        ) from error


def parse_split_globs(text: str) -> dict[str, str]:
    """Parse `--clickme_files`: `split=glob` pairs separated by commas.

    Raises:
        ValueError: if an item has no `=`.
    """
    result = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ValueError(
                f"--clickme_files items must be split=glob, got {item!r}; for example "
                "train=/data/clickme/train-*.tfrecords"
            )
        split, pattern = item.split("=", 1)
        result[split.strip()] = pattern.strip()
    return result


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command-line flags (only when run as a script, so modules import cleanly)."""
    flags.DEFINE_string("input_dir", None, "Folder with one ImageNet folder per split.")
    flags.DEFINE_string("output_dir", None, "Folder for the shards and manifest.json.")
    flags.DEFINE_list("splits", ["train", "val"], "Split folder names to build.")
    flags.DEFINE_string(
        "num_shards",
        ",".join(f"{k}={v}" for k, v in DEFAULT_NUM_SHARDS.items()),
        "Shards per split: one count for all splits, or split=count pairs.",
    )
    flags.DEFINE_string("maps_dir", "", "Folder with <split>/.../<image stem>.png|.npy maps.")
    flags.DEFINE_enum("map_source", "file", list(MAP_SOURCES_FOR_FILES), "map/source of maps.")
    flags.DEFINE_integer("seed", 0, "Seed of the per-split shuffle.")
    flags.DEFINE_integer(
        "max_shorter_side", 0, "Resize images whose shorter side is longer (pixels); 0 keeps."
    )
    flags.DEFINE_float("map_blur_sigma", 0.0, "Gaussian blur of stored maps (pixels); 0: none.")
    flags.DEFINE_string("clickme_files", "", "split=glob pairs of released ClickMe shards.")
    flags.DEFINE_enum(
        "unmatched_clickme",
        "list",
        list(UNMATCHED_CLICKME_MODES),
        "list: report unmatched ClickMe examples; write: also write them from their own image.",
    )
    flags.DEFINE_float("clickme_min_correlation", 0.9, "Lowest thumbnail correlation to match.")
    flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Worker processes.")
    flags.DEFINE_bool("overwrite", False, "Replace a build with other arguments in output_dir.")
    flags.DEFINE_bool("progress", True, "Show progress bars with ETA.")
    flags.DEFINE_bool(
        "tfds_metadata", True, "Write dataset_info.json for tfds.builder_from_directory."
    )
    flags.mark_flags_as_required(["input_dir", "output_dir"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    splits = tuple(FLAGS.splits)
    try:
        num_shards = parse_num_shards(FLAGS.num_shards, splits)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    config = BuildConfig(
        input_dir=FLAGS.input_dir,
        output_dir=FLAGS.output_dir,
        splits=splits,
        num_shards=num_shards,
        maps_dir=FLAGS.maps_dir,
        map_source=FLAGS.map_source,
        seed=FLAGS.seed,
        max_shorter_side=FLAGS.max_shorter_side,
        map_blur_sigma=FLAGS.map_blur_sigma,
        clickme_files=parse_split_globs(FLAGS.clickme_files),
        unmatched_clickme=FLAGS.unmatched_clickme,
        clickme_min_correlation=FLAGS.clickme_min_correlation,
        num_workers=FLAGS.num_workers,
        overwrite=FLAGS.overwrite,
        show_progress=FLAGS.progress,
        tfds_metadata=FLAGS.tfds_metadata,
    )
    # Invalid arguments end with a one-line message, without a traceback or the flag help.
    try:
        config.validate()
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    build(config)


if __name__ == "__main__":
    define_flags()
    app.run(main)
