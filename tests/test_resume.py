"""Kill real training processes with SIGKILL and check that the resumed run is exact.

A reference process trains a tiny harmonized CNN on real TFRecords for ``TOTAL_STEPS`` steps
without interruption. A second run is killed mid-epoch, restarted, killed again while a
checkpoint is being saved (after its files are written, before the state file names it),
restarted once more and finishes. It must resume from the last complete checkpoint each time,
with the learning rate of that step, and end with the reference weights.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

REPO_ROOT = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 12
STEPS_PER_EPOCH = 5
CHECKPOINT_EVERY = 4
WARMUP_STEPS = 3
PEAK_LEARNING_RATE = 0.1
BATCH = 4
IMAGE_SIZE = 32
NUM_CLASSES = 3
NUM_RECORDS = 12
# Step after which the first run is killed: past checkpoint 4, mid-epoch 2, before checkpoint 8.
KILL_AFTER_STEP = 6
# Checkpoint during whose save the second run is killed.
KILL_IN_SAVE_STEP = 8
PROCESS_TIMEOUT_SECONDS = 240


def _write_records(path: Path) -> None:
    from harmonizer import records

    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for index in range(NUM_RECORDS):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            has_map = index % 2 == 0
            map_png = b""
            if has_map:
                map_pixels = rng.integers(0, 256, (20, 24, 1), dtype=np.uint8)
                map_png = tf.io.encode_png(map_pixels).numpy()
            record = records.Record(
                image_jpeg=tf.io.encode_jpeg(pixels).numpy(),
                label=index % NUM_CLASSES,
                filename=f"image_{index}.JPEG",
                map_png=map_png,
                map_source="file" if has_map else "none",
            )
            writer.write(records.serialize(record))


def worker(model_dir: str, pause_in_save_step: int, pause_after_step: int) -> None:
    """Subprocess entry point: train, resuming from ``model_dir``; print one line per step.

    The worker sleeps, waiting to be killed, inside the save of checkpoint
    ``pause_in_save_step`` or after step ``pause_after_step`` (-1 for neither).
    """
    import keras

    from harmonizer import checkpointing, data, zoo
    from harmonizer.model import Harmonizer
    from harmonizer.schedules import WarmupCosine

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    record_path = Path(model_dir) / "train-00000-of-00001"
    if not record_path.exists():
        _write_records(record_path)

    def dataset():
        config = data.PipelineConfig(
            file_pattern=str(record_path),
            batch_size=BATCH,
            image_size=IMAGE_SIZE,
            training=True,
            seed=0,
            shuffle_buffer=NUM_RECORDS,
            deterministic=True,
        )
        return data.build_dataset(config)

    backbone = zoo.build("small_cnn", num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, widths=(4, 8))
    model = Harmonizer(backbone, harmonization_weight=1.0, weight_decay=1e-4)
    schedule = WarmupCosine(PEAK_LEARNING_RATE, WARMUP_STEPS, TOTAL_STEPS)
    model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9))

    class Report(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            step = checkpointing.current_step(self.model)
            rate = checkpointing.current_learning_rate(self.model)
            print(f"BEGIN {step} {rate!r}", flush=True)

        def on_train_batch_end(self, batch, logs=None):
            step = checkpointing.current_step(self.model)
            print(f"STEP {step}", flush=True)
            if step == pause_after_step:
                time.sleep(PROCESS_TIMEOUT_SECONDS)

    def pause_in_save(save_path):
        # Runs after the checkpoint files are written, before the state file names them.
        if save_path.endswith(f"-{pause_in_save_step}"):
            print(f"WRITTEN {save_path}", flush=True)
            time.sleep(PROCESS_TIMEOUT_SECONDS)

    options = tf.train.CheckpointOptions(experimental_write_callbacks=[pause_in_save])
    run = checkpointing.RunSchedule(
        total_steps=TOTAL_STEPS,
        steps_per_epoch=STEPS_PER_EPOCH,
        global_batch_size=BATCH,
        checkpoint_every=CHECKPOINT_EVERY,
        max_to_keep=2,
        log_every=1,
        image_every=CHECKPOINT_EVERY,
    )
    _, start = checkpointing.fit_resumable(
        model,
        lambda skip: dataset().skip(skip),
        model_dir,
        run,
        image_batch=next(iter(dataset())),
        callbacks=[Report()],
        checkpoint_options=options,
    )
    weights = {f"w{i}": w for i, w in enumerate(backbone.get_weights())}
    np.savez(Path(model_dir) / "final_weights.npz", **weights)
    print(f"DONE {start} {checkpointing.current_step(model)}", flush=True)


def _start(
    model_dir: Path, pause_in_save_step: int = -1, pause_after_step: int = -1
) -> subprocess.Popen:
    arguments = f"{str(model_dir)!r}, {pause_in_save_step}, {pause_after_step}"
    command = f"from tests import test_resume as t; t.worker({arguments})"
    # stderr goes to a file, because an unread pipe could fill up and block the worker.
    stderr = open(model_dir / "worker.log", "a")  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(
        [sys.executable, "-c", command],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def _read_until(process: subprocess.Popen, predicate, model_dir: Path) -> list[str]:
    """Read stdout lines until ``predicate(line)`` is true; return the lines read."""
    lines = []
    deadline = time.monotonic() + PROCESS_TIMEOUT_SECONDS
    for line in process.stdout:
        lines.append(line.strip())
        if predicate(line.strip()):
            return lines
        if time.monotonic() > deadline:
            break
    process.kill()
    log_tail = (model_dir / "worker.log").read_text()[-3000:]
    raise AssertionError(f"worker ended or timed out before the expected line: {lines}\n{log_tail}")


def _kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def _run_to_end(process: subprocess.Popen, model_dir: Path) -> list[str]:
    lines = _read_until(process, lambda line: line.startswith("DONE"), model_dir)
    process.wait(timeout=30)
    assert process.returncode == 0
    return lines


def _begin(lines: list[str]) -> tuple[int, float]:
    _, step, rate = next(line for line in lines if line.startswith("BEGIN")).split()
    return int(step), float(rate)


def _expected_rate(step: int) -> float:
    from harmonizer.schedules import WarmupCosine

    return float(WarmupCosine(PEAK_LEARNING_RATE, WARMUP_STEPS, TOTAL_STEPS)(step))


def _latest_step(model_dir: Path) -> int | None:
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    return None if latest is None else int(latest.rsplit("-", 1)[1])


def _read_summaries(log_dir: Path) -> dict[str, list[int]]:
    """Return ``{"<writer>/<tag>": [steps]}`` of the event files under ``log_dir``."""
    steps: dict[str, list[int]] = {}
    for path in log_dir.glob("*/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                steps.setdefault(f"{path.parent.name}/{value.tag}", []).append(event.step)
    return steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the reference and the killed-and-resumed run concurrently; return their logs."""
    reference_dir = tmp_path_factory.mktemp("reference")
    resumed_dir = tmp_path_factory.mktemp("resumed")
    reference = _start(reference_dir)
    log = {}

    first = _start(resumed_dir, KILL_IN_SAVE_STEP, KILL_AFTER_STEP)
    log["first"] = _read_until(first, lambda line: line == f"STEP {KILL_AFTER_STEP}", resumed_dir)
    _kill(first)
    log["latest_after_first_kill"] = _latest_step(resumed_dir)

    second = _start(resumed_dir, KILL_IN_SAVE_STEP)
    log["second"] = _read_until(second, lambda line: line.startswith("WRITTEN"), resumed_dir)
    _kill(second)
    log["latest_after_second_kill"] = _latest_step(resumed_dir)
    log["leftover_files"] = sorted(os.listdir(resumed_dir / "checkpoints"))

    third = _start(resumed_dir)
    log["third"] = _run_to_end(third, resumed_dir)
    log["reference"] = _run_to_end(reference, reference_dir)
    log["reference_weights"] = dict(np.load(reference_dir / "final_weights.npz"))
    log["summaries"] = _read_summaries(reference_dir / "tensorboard")
    log["resumed_weights"] = dict(np.load(resumed_dir / "final_weights.npz"))
    log["checkpoints"] = sorted(os.listdir(resumed_dir / "checkpoints"))
    return log


def test_resume_after_kill_mid_epoch(runs):
    assert runs["latest_after_first_kill"] == CHECKPOINT_EVERY
    step, rate = _begin(runs["second"])
    assert step == CHECKPOINT_EVERY
    np.testing.assert_allclose(rate, _expected_rate(CHECKPOINT_EVERY), rtol=1e-6)


def test_kill_during_save_keeps_last_good(runs):
    assert any(name.startswith(f"ckpt-{KILL_IN_SAVE_STEP}.") for name in runs["leftover_files"])
    assert runs["latest_after_second_kill"] == CHECKPOINT_EVERY
    step, rate = _begin(runs["third"])
    assert step == CHECKPOINT_EVERY
    np.testing.assert_allclose(rate, _expected_rate(CHECKPOINT_EVERY), rtol=1e-6)


def test_resumed_run_finishes(runs):
    assert runs["third"][-1] == f"DONE {CHECKPOINT_EVERY} {TOTAL_STEPS}"
    steps = [int(line.split()[1]) for line in runs["third"] if line.startswith("STEP")]
    assert steps == list(range(CHECKPOINT_EVERY + 1, TOTAL_STEPS + 1))


def test_resumed_weights_match_uninterrupted(runs):
    assert runs["reference"][-1] == f"DONE 0 {TOTAL_STEPS}"
    reference = runs["reference_weights"]
    resumed = runs["resumed_weights"]
    assert reference.keys() == resumed.keys()
    for key in reference:
        np.testing.assert_allclose(resumed[key], reference[key], rtol=1e-5, atol=1e-6)


def test_checkpoints_bounded(runs):
    indexes = {name for name in runs["checkpoints"] if name.endswith(".index")}
    assert indexes == {f"ckpt-{CHECKPOINT_EVERY * 2}.index", f"ckpt-{TOTAL_STEPS}.index"}


@pytest.mark.parametrize(
    "tag",
    ["loss", "cross_entropy", "harmonization", "weight_decay", "accuracy", "learning_rate"],
)
def test_scalar_summaries_every_step(runs, tag):
    assert runs["summaries"][f"train/{tag}"] == list(range(1, TOTAL_STEPS + 1))


def test_saliency_image_summaries(runs):
    steps = runs["summaries"]["images/input_saliency_map"]
    assert steps[:3] == [CHECKPOINT_EVERY, 2 * CHECKPOINT_EVERY, 3 * CHECKPOINT_EVERY]


def test_launch_run_trains_then_finds_run_complete(tmp_path):
    """The entrypoint's run path: mixup, checkpoints, validation, then a rerun that resumes."""
    from harmonizer import launch, training

    records_dir = tmp_path / "records"
    records_dir.mkdir()
    _write_records(records_dir / "train-00000-of-00001")
    _write_records(records_dir / "val-00000-of-00001")
    config = training.TrainConfig(
        data_dir=str(records_dir),
        model_dir=str(tmp_path / "run"),
        model="small_cnn",
        num_classes=NUM_CLASSES,
        image_size=IMAGE_SIZE,
        batch_size=BATCH,
        epochs=2.0,
        steps_per_epoch=2,
        warmup_epochs=0.5,
        learning_rate=0.05,
        deterministic=True,
        export=False,
    )
    options = launch.LaunchOptions(mixup_alpha=0.2, checkpoint_every=2, log_every=1, image_every=2)

    first = launch.run(config, options)
    assert first["resumed_from_step"] == 0
    assert first["steps"] == 4
    assert set(first["train"]) >= {"loss", "cross_entropy", "harmonization", "accuracy"}
    assert "alignment" in first["validation"]
    assert _latest_step(tmp_path / "run") == 4

    second = launch.run(config, options)
    assert second["resumed_from_step"] == 4
    assert "train" not in second


def test_nan_loss_stops_run_naming_step(tmp_path):
    import keras

    from harmonizer import checkpointing, zoo
    from harmonizer.model import Harmonizer

    backbone = zoo.build("small_cnn", num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, widths=(4,))
    model = Harmonizer(backbone, harmonization_weight=1.0)
    model.compile(optimizer=keras.optimizers.SGD(0.01), run_eagerly=True)
    features = {
        "image": np.full((BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), np.nan, "float32"),
        "map": np.ones((BATCH, IMAGE_SIZE, IMAGE_SIZE), "float32"),
        "has_map": np.ones(BATCH, "float32"),
    }
    labels = np.zeros(BATCH, "int32")
    dataset = tf.data.Dataset.from_tensors((features, labels)).repeat()
    schedule = checkpointing.RunSchedule(
        total_steps=3, steps_per_epoch=3, global_batch_size=BATCH, checkpoint_every=1
    )
    with pytest.raises(FloatingPointError, match="at step 1 "):
        checkpointing.fit_resumable(model, dataset, str(tmp_path), schedule)
    # No checkpoint of the diverged weights was written.
    assert _latest_step(tmp_path) is None
