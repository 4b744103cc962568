"""Benchmark the training input pipeline against a reference loader on the same shards.

Run by hand (not a test):

    python -m benchmarks.bench_pipeline                # builds the shards on first use

The shards are built with `tfrecords.build` from the vendored photos in
`data/tiny_imagenet_real/` (140 photos, 41 of them with an object-silhouette mask as the map;
silhouettes are not human data but cost the same to load), twice:

* ``256px``: every image resized so that its shorter side is 256 pixels;
* ``full``: the photos as they are, mostly 500 x 281 to 500 x 375, the size of ImageNet JPEGs.

Maps are blurred at build time (``--map_blur_sigma``) and stored at their image's resolution.

Two loaders read the same shards, with the same interleave, shuffle, parallel map, batching and
prefetch, and the same thread pool:

* ``pipeline``: `harmonizer.data.build_dataset` (fused JPEG decode-and-crop, map cropped
  before it is converted, no per-example blur);
* ``reference``: the per-example work of the original ClickMe loader. It decodes the whole JPEG
  and PNG, resizes the map to its image and blurs it with a 10 x 10 Gaussian. Then it takes the
  same random-resized crop and flip from the decoded tensors. It also runs as TensorFlow ops.

Each loader runs with a private thread pool of ``--threads`` threads (default 1). Images per
core-second is the number of images divided by the CPU time this process spent loading them
(all threads, `time.process_time`), which waiting for a core on a shared machine does not
inflate; wall-clock images/s are printed too. Rounds alternate the loaders, and each ratio is
the median of per-round ratios.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from harmonizer import data, records  # noqa: E402
from tfrecords import build  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS_DIR = os.path.join(REPO_ROOT, "data", "tiny_imagenet_real")
SHARD_SETS = {"256px": 256, "full": 0}
SPLIT = "val"
NUM_SHARDS = 4
# The reference loader's map blur: a 10 x 10 Gaussian kernel, sigma 3 pixels.
REFERENCE_BLUR_SIZE = 10
REFERENCE_BLUR_SIGMA = 3.0

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", "/tmp/harmonizer_bench_pipeline", "Where the shards are built.")
flags.DEFINE_integer("image_size", 224, "Output side in pixels.")
flags.DEFINE_integer("batch_size", 32, "Examples per batch.")
flags.DEFINE_integer("images", 1024, "Images loaded per loader per round.")
flags.DEFINE_integer("rounds", 5, "Rounds; each times both loaders once on each shard set.")
flags.DEFINE_integer("threads", 1, "Threads of each loader's private thread pool.")
flags.DEFINE_float("map_blur_sigma", 3.0, "Build-time blur of the stored maps, in pixels.")


def build_shards(work_dir: str) -> dict[str, str]:
    """Build each shard set once; return its file pattern by name."""
    patterns = {}
    for name, max_shorter_side in SHARD_SETS.items():
        output_dir = os.path.join(work_dir, name)
        if not tf.io.gfile.glob(os.path.join(output_dir, f"{SPLIT}-*")):
            build.build(
                build.BuildConfig(
                    input_dir=PHOTOS_DIR,
                    output_dir=output_dir,
                    splits=(SPLIT,),
                    num_shards={SPLIT: NUM_SHARDS},
                    maps_dir=os.path.join(PHOTOS_DIR, "masks"),
                    map_source="silhouette",
                    max_shorter_side=max_shorter_side,
                    map_blur_sigma=FLAGS.map_blur_sigma,
                    show_progress=False,
                    tfds_metadata=False,
                )
            )
        patterns[name] = os.path.join(output_dir, f"{SPLIT}-*")
    return patterns


def _gaussian_kernel(size: int, sigma: float) -> tf.Tensor:
    positions = np.arange(size, dtype=np.float32) - (size - 1) / 2.0
    taps = np.exp(-(positions**2) / (2.0 * sigma**2))
    kernel = np.outer(taps, taps)
    return tf.constant((kernel / kernel.sum())[:, :, None, None], tf.float32)


def reference_preprocess(serialized: tf.Tensor, seed: tf.Tensor, image_size: int):
    """Decode everything, resize and blur the map, then crop and flip (the reference's work)."""
    example = records.parse(serialized)
    image = tf.io.decode_jpeg(example[records.IMAGE_KEY], channels=3)
    image_shape = tf.shape(image)[:2]
    has_map = example[records.HAS_MAP_KEY] > 0
    map_image = tf.cond(
        has_map,
        lambda: tf.cast(tf.io.decode_png(example[records.MAP_KEY], channels=1), tf.float32),
        lambda: tf.zeros([1, 1, 1], tf.float32),
    )
    map_image = tf.image.resize(map_image, image_shape)
    map_image = tf.nn.conv2d(
        map_image[None],
        _gaussian_kernel(REFERENCE_BLUR_SIZE, REFERENCE_BLUR_SIGMA),
        strides=1,
        padding="SAME",
    )[0]

    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    window = data._random_window(tf.concat([image_shape, [3]], 0), crop_seed)
    image = tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])
    map_image = tf.image.crop_to_bounding_box(map_image, window[0], window[1], window[2], window[3])
    image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size])
    map_image = tf.image.resize(map_image, [image_size, image_size])[..., 0] / 255.0
    flip = tf.random.stateless_uniform([], seed=flip_seed) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    map_image = tf.cond(flip, lambda: tf.reverse(map_image, axis=[1]), lambda: map_image)
    features = {"image": image, "map": map_image, "has_map": tf.cast(has_map, tf.float32)}
    return features, tf.cast(example[records.LABEL_KEY], tf.int32)


def threading_options(threads: int) -> tf.data.Options:
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    return options


def reference_dataset(pattern: str, image_size: int, batch_size: int, threads: int):
    """Build the reference loader, with the same dataset structure as `data.build_dataset`."""
    files = tf.data.Dataset.list_files(pattern, shuffle=True, seed=0)
    dataset = files.interleave(
        tf.data.TFRecordDataset,
        cycle_length=tf.data.AUTOTUNE,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    dataset = dataset.shuffle(data.DEFAULT_SHUFFLE_BUFFER, seed=0).repeat()
    seeds = tf.data.Dataset.random(seed=0).batch(2)
    dataset = tf.data.Dataset.zip((dataset, seeds)).map(
        lambda serialized, seed: reference_preprocess(serialized, seed, image_size),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    dataset = dataset.batch(batch_size, drop_remainder=True)
    return dataset.with_options(threading_options(threads)).prefetch(tf.data.AUTOTUNE)


def pipeline_dataset(pattern: str, image_size: int, batch_size: int, threads: int):
    config = data.PipelineConfig(
        pattern, batch_size, image_size, training=True, seed=0, num_threads=threads
    )
    return data.build_dataset(config)


def throughput(dataset: tf.data.Dataset, images: int, batch_size: int) -> tuple[float, float]:
    """Load ``images`` images (whole batches) after one warm-up batch.

    Returns:
        ``(images per wall-clock second, images per CPU second of this process)``.
    """
    iterator = iter(dataset)
    next(iterator)
    batches = max(1, images // batch_size)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    loaded = batches * batch_size
    return loaded / (time.perf_counter() - start_wall), loaded / (time.process_time() - start_cpu)


def main(argv):
    del argv
    patterns = build_shards(FLAGS.work_dir)
    loaders = {"pipeline": pipeline_dataset, "reference": reference_dataset}
    print(
        f"TF {tf.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"{FLAGS.threads} thread(s) per loader, {FLAGS.image_size}px, batch {FLAGS.batch_size}"
    )
    for name, pattern in patterns.items():
        wall = {loader: [] for loader in loaders}
        cpu = {loader: [] for loader in loaders}
        for _ in range(FLAGS.rounds):
            for loader, make in loaders.items():
                dataset = make(pattern, FLAGS.image_size, FLAGS.batch_size, FLAGS.threads)
                wall_rate, cpu_rate = throughput(dataset, FLAGS.images, FLAGS.batch_size)
                wall[loader].append(wall_rate)
                cpu[loader].append(cpu_rate)
        for label, rates in (("images per core-second", cpu), ("images/s, wall clock", wall)):
            ratio = float(np.median(np.array(rates["pipeline"]) / np.array(rates["reference"])))
            print(
                f"{name:>6} shards, {label}: pipeline {np.median(rates['pipeline']):.0f}, "
                f"reference {np.median(rates['reference']):.0f}, pipeline/reference {ratio:.2f}x"
            )
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    app.run(main)
