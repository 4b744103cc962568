"""Every shipped flagfile parses with the flags of experiments/train.py and validates."""

from pathlib import Path

import pytest
from absl import flags

from experiments import train
from harmonizer import distribute, launch, training, zoo

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
FLAGFILES = sorted(EXPERIMENTS_DIR.glob("*.flags"))
PAPER_MODELS = ("resnet50", "vgg16", "vit_b16", "efficientnetb0")
PAPER_FLAGFILES = [
    EXPERIMENTS_DIR / f"{model}_{variant}.flags"
    for model in PAPER_MODELS
    for variant in ("harmonized", "baseline")
]
# A v4 chip runs its two TensorCores as one device (megacore): a v4-8 has 4 replicas.
TPU_V4_8_REPLICAS = 4
HEADER_FIELDS = ("Command:", "Hardware:", "Expected time:")


class _Replicas:
    """The replica count of TPUStrategy on a v4-8 (one replica per chip)."""

    num_replicas_in_sync = TPU_V4_8_REPLICAS


@pytest.fixture
def data_dir(tmp_path):
    """A directory that satisfies TrainConfig.validate's check for training shards."""
    (tmp_path / "train-00000-of-00001").write_bytes(b"")
    return tmp_path


@pytest.fixture
def parse_flags():
    """Parse argv with the flags of experiments/train.py; reset them afterwards."""

    def parse(*arguments):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train", *arguments])
        return train.config_from_flags(), train.options_from_flags()

    yield parse
    flags.FLAGS.unparse_flags()


def _validate(config: training.TrainConfig, options: launch.LaunchOptions) -> None:
    config.validate()
    options.validate(config.epochs)
    zoo.check_image_size(config.model, config.image_size)


def test_paper_flagfiles_exist():
    missing = [path.name for path in PAPER_FLAGFILES if not path.exists()]
    assert not missing


@pytest.mark.parametrize("path", FLAGFILES, ids=lambda path: path.name)
def test_flagfile_parses_and_validates(path, parse_flags, data_dir):
    config, options = parse_flags(
        f"--flagfile={path}", f"--data_dir={data_dir}", f"--model_dir={data_dir}/run"
    )
    _validate(config, options)


@pytest.mark.parametrize("path", FLAGFILES, ids=lambda path: path.name)
def test_flagfile_header_states_command(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    for field in HEADER_FIELDS:
        assert any(field in line for line in header), field
    assert any(f"--flagfile=experiments/{path.name}" in line for line in header)


@pytest.mark.parametrize("path", PAPER_FLAGFILES, ids=lambda path: path.name)
def test_paper_flagfile_follows_recipe(path, parse_flags, data_dir):
    config, options = parse_flags(
        f"--flagfile={path}", f"--data_dir={data_dir}", f"--model_dir={data_dir}/run"
    )
    assert config.model == path.stem.rsplit("_", 1)[0]
    assert config.num_classes == 1000
    assert config.image_size == 224
    assert config.batch_size == 512
    assert distribute.per_replica_batch_size(config.batch_size, _Replicas()) == 128
    assert config.learning_rate == 0.3
    assert config.warmup_epochs == 5
    assert config.epochs == 90
    assert config.momentum == 0.9
    assert config.label_smoothing > 0
    assert config.deterministic
    assert options.mixup_alpha > 0
    assert options.precision == "bfloat16"
    assert options.tpu == "local"
    assert options.lr_schedule == "cosine"


@pytest.mark.parametrize("model", PAPER_MODELS)
def test_baseline_differs_only_in_weight(model):
    harmonized = training.read_flagfile(str(EXPERIMENTS_DIR / f"{model}_harmonized.flags"))
    baseline = training.read_flagfile(str(EXPERIMENTS_DIR / f"{model}_baseline.flags"))
    assert float(harmonized.pop("harmonization_weight")) > 0
    assert float(baseline.pop("harmonization_weight")) == 0
    assert harmonized == baseline


@pytest.mark.parametrize("path", PAPER_FLAGFILES, ids=lambda path: path.name)
def test_local_shrink_validates(path, parse_flags, data_dir):
    config, options = parse_flags(
        f"--flagfile={path}",
        f"--data_dir={data_dir}",
        f"--model_dir={data_dir}/run",
        "--local",
        "--lr_schedule=piecewise",
    )
    assert train.FLAGS.local
    config, options = launch.local_overrides(config, options)
    _validate(config, options)
    assert config.image_size == launch.LOCAL_IMAGE_SIZE
    assert config.learning_rate == pytest.approx(0.3 * launch.LOCAL_BATCH_SIZE / 512)
    assert options.tpu == ""
    assert options.precision == "float32"
    assert options.lr_decay_epochs == pytest.approx((30 / 45, 50 / 45, 80 / 45))


@pytest.mark.parametrize(
    "argument",
    ["--no_such_flag=1", "--batch_size=many", "--lr_schedule=step", "--precision=float16"],
)
def test_broken_flag_rejected(argument, parse_flags, data_dir):
    with pytest.raises(flags.Error):
        parse_flags(f"--data_dir={data_dir}", f"--model_dir={data_dir}", argument)


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("--mixup_alpha=-1", "mixup_alpha"),
        ("--checkpoint_every=0", "checkpoint_every"),
        ("--lr_decay_epochs=30,20", "lr_decay_epochs"),
        ("--lr_decay_epochs=30,95", "lr_decay_epochs"),
        ("--lr_decay_factor=1.5", "lr_decay_factor"),
    ],
)
def test_invalid_option_rejected(argument, message, parse_flags, data_dir):
    config, options = parse_flags(
        f"--data_dir={data_dir}", f"--model_dir={data_dir}", "--lr_schedule=piecewise", argument
    )
    with pytest.raises(ValueError, match=message):
        _validate(config, options)


def test_broken_flagfile_rejected(tmp_path, parse_flags, data_dir):
    broken = tmp_path / "broken.flags"
    broken.write_text("# Command: none\n--model=resnet50\n--mixup_alfa=0.2\n")
    with pytest.raises(flags.Error, match="mixup_alfa"):
        parse_flags(f"--flagfile={broken}", f"--data_dir={data_dir}", f"--model_dir={data_dir}")


def test_flagfile_unknown_model_rejected(tmp_path, parse_flags, data_dir):
    broken = tmp_path / "broken.flags"
    broken.write_text("--model=resnet51\n")
    config, options = parse_flags(
        f"--flagfile={broken}", f"--data_dir={data_dir}", f"--model_dir={data_dir}"
    )
    with pytest.raises(ValueError, match="resnet51"):
        _validate(config, options)
