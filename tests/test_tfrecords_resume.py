"""A build killed halfway (a real process, SIGKILL) resumes to the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tfrecords import build, verify
from tfrecords.make_tiny import SOURCE_DIR

REPOSITORY = Path(__file__).resolve().parents[1]
NUM_SHARDS = 5
KILL_AFTER = 70  # of the 140 vendored photos: mid-way through the third shard


def _config(output: Path) -> build.BuildConfig:
    return build.BuildConfig(
        input_dir=str(SOURCE_DIR),
        output_dir=str(output),
        splits=("val",),
        num_shards={"val": NUM_SHARDS},
        maps_dir=str(SOURCE_DIR / "masks"),
        map_source="silhouette",
        show_progress=False,
    )


def test_killed_build_resumes_to_same_manifest(tmp_path: Path) -> None:
    interrupted = tmp_path / "interrupted"
    command = [
        sys.executable,
        "-m",
        "tfrecords.build",
        f"--input_dir={SOURCE_DIR}",
        f"--output_dir={interrupted}",
        "--splits=val",
        f"--num_shards=val={NUM_SHARDS}",
        f"--maps_dir={SOURCE_DIR / 'masks'}",
        "--map_source=silhouette",
        "--num_workers=1",
        "--noprogress",
    ]
    environment = dict(os.environ, **{build.KILL_AFTER_EXAMPLES_ENV: str(KILL_AFTER)})
    result = subprocess.run(
        command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]

    partial = json.loads((interrupted / "manifest.json").read_text())
    finished = [entry for entry in partial["splits"]["val"]["shards"] if entry is not None]
    assert partial["complete"] is False
    assert 0 < len(finished) < NUM_SHARDS
    assert list(interrupted.glob("*.tmp")), "the kill should leave a partial shard"
    finished_mtimes = {e["file"]: (interrupted / e["file"]).stat().st_mtime_ns for e in finished}

    resumed = build.build(_config(interrupted))
    reference = build.build(_config(tmp_path / "reference"))

    assert resumed == reference
    assert json.loads((interrupted / "manifest.json").read_text()) == resumed
    assert not list(interrupted.glob("*.tmp"))
    for name, mtime in finished_mtimes.items():
        assert (interrupted / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    for index in range(NUM_SHARDS):
        name = f"val-{index:05d}-of-{NUM_SHARDS:05d}"
        assert (interrupted / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert verify.verify(str(interrupted), num_decode=10).errors == []

    command = [sys.executable, "-m", "tfrecords.verify", f"--records_dir={interrupted}"]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
