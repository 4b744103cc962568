"""Profile training steps and print where their time goes, by pass and by op type.

Run by hand (not a test):

    python -m benchmarks.profile_step --model=resnet50 --image_size=224 --batch_size=8
    python -m benchmarks.profile_step --model=small_cnn --image_size=64 --batch_size=32

For each variant (as in `benchmarks.bench_step`: ``plain``, ``full``, ``sub k=...``) it traces
``--steps`` steps with the TensorFlow profiler after one warm-up step and reads the host trace
(`XSpace` protobuf). Each TensorFlow op event is named ``scope/name:Type``; ops are grouped

* by pass, from how many ``gradient_tape/`` prefixes the name carries: 0 is the forward pass
  and the loss, 1 a first-order backward pass (the saliency, and the cross-entropy gradient),
  2 or more the second-order pass that differentiates the saliency;
* by op type, with oneDNN's ``_Mkl``/``_MklNative`` prefixes removed.

Times are summed over threads, so they are CPU time, not wall time. The shares show which work
to cut.
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

from benchmarks import bench_step  # noqa: E402
from harmonizer import zoo  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 2, "Profiled steps per variant.")
flags.DEFINE_integer("top", 12, "Op types listed per variant.")

PICOSECONDS_PER_SECOND = 1e12
PASS_NAMES = ("forward + loss", "first-order backward", "second-order backward")
ONEDNN_PREFIXES = ("_MklNative", "_Mkl")


def op_times(xplane_path: str) -> list[tuple[str, str, float]]:
    """Return (op name, op type, seconds) for every TF op event on the host plane."""
    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    events = []
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                label = plane.event_metadata[event.metadata_id].name
                # Op events read "name:Type"; runtime events contain "::" or spaces.
                name, separator, op_type = label.rpartition(":")
                if not (separator and name and op_type) or " " in label or "::" in label:
                    continue
                for prefix in ONEDNN_PREFIXES:
                    op_type = op_type.removeprefix(prefix)
                events.append((name, op_type, event.duration_ps / PICOSECONDS_PER_SECOND))
    return events


def profile(model, features, labels, steps: int) -> list[tuple[str, str, float]]:
    model.train_on_batch(features, labels)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(steps):
            model.train_on_batch(features, labels)
        tf.profiler.experimental.stop()
        (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        return op_times(path)


def report(name: str, events: list[tuple[str, str, float]], steps: int, top: int) -> None:
    by_pass = collections.Counter()
    by_type = collections.Counter()
    for op_name, op_type, seconds in events:
        depth = min(op_name.count("gradient_tape/"), len(PASS_NAMES) - 1)
        by_pass[PASS_NAMES[depth]] += seconds / steps
        by_type[op_type] += seconds / steps
    total = sum(by_pass.values())
    print(f"\n== {name}: {total:.3f} CPU s of TF ops per step")
    for pass_name in PASS_NAMES:
        print(f"  {pass_name:<22} {by_pass[pass_name]:8.3f} s  {by_pass[pass_name] / total:6.1%}")
    print("  top op types:")
    for op_type, seconds in by_type.most_common(top):
        print(f"    {op_type:<32} {seconds:8.3f} s  {seconds / total:6.1%}")


def main(argv):
    del argv
    keras.utils.set_random_seed(FLAGS.seed)
    reference = zoo.build(FLAGS.model, num_classes=FLAGS.num_classes, image_size=FLAGS.image_size)
    initial_weights = reference.get_weights()
    variants = {"plain": (0.0, 0), "full": (1.0, 0)}
    for text in FLAGS.subbatch:
        variants[f"sub k={int(text)}"] = (1.0, int(text))
    features, labels = bench_step.fixed_batch(
        FLAGS.batch_size, FLAGS.image_size, FLAGS.num_classes, FLAGS.seed
    )
    print(f"{FLAGS.model} {FLAGS.image_size}px batch {FLAGS.batch_size}, TF {tf.__version__}")
    for name, spec in variants.items():
        model = bench_step.build_variant(*spec, initial_weights)
        report(name, profile(model, features, labels, FLAGS.steps), FLAGS.steps, FLAGS.top)


if __name__ == "__main__":
    app.run(main)
