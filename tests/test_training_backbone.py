"""The shared training backbone: typed config with YAML and flags, schedule, data order across ranks."""

import itertools
import math
import re
from pathlib import Path

import pytest
import yaml

from inference.cli import UsageError
from training.config import TrainConfig, parse_config
from training.optim import lr_factor
from training.stage1_align import Stage1Config
from training.trainer import epoch_batches

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["--train-data", "train.json", "--image-folder", "images"]


def test_defaults_follow_llava_stage1():
    config = parse_config(Stage1Config, REQUIRED)
    assert (config.lr, config.global_batch_size, config.warmup_ratio, config.lr_schedule, config.epochs) == (
        1e-3, 256, 0.03, "cosine", 1.0,
    )  # fmt: skip
    assert config.projector == "mlp2x_gelu" and config.vision_feature_layer == -2


def test_yaml_sets_fields_and_flags_override_it(tmp_path):
    original = ROOT / "training" / "configs" / "stage1_original.yaml"
    config = parse_config(Stage1Config, ["--config", str(original), *REQUIRED, "--lr", "5e-5", "--no-resume"])
    assert config.projector == "linear" and config.vision_feature_layer == -1 and config.max_steps == 10_000
    assert config.lr == 5e-5 and config.lr_schedule == "constant" and config.resume is False
    config.save(tmp_path)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["lr"] == 5e-5 and saved["betas"] == [0.9, 0.999]
    assert parse_config(Stage1Config, ["--config", str(tmp_path / "config.yaml")]) == config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image-folder", "x"], "--train-data is required"),
        ([*REQUIRED, "--lr", "0"], "lr must be positive"),
        ([*REQUIRED, "--projector", "mlp3x"], "invalid choice"),
        ([*REQUIRED, "--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1)"),
        ([*REQUIRED, "--warmup-steps", "-2"], "--warmup-steps must be -1"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(argv, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_config(Stage1Config, argv)


def test_unknown_yaml_fields_are_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(UsageError, match=re.escape("unknown fields ['learning_rate']")):
        parse_config(Stage1Config, ["--config", str(tmp_path / "bad.yaml"), *REQUIRED])


def test_warmup_is_a_typed_setting():
    assert TrainConfig(warmup_ratio=0.1).warmup_for(200) == 20
    assert TrainConfig(warmup_ratio=0.1, warmup_steps=7).warmup_for(200) == 7
    assert TrainConfig(warmup_steps=0).warmup_for(200) == 0


def test_a_config_is_its_own_command_line():
    config = parse_config(Stage1Config, [*REQUIRED, "--lr", "5e-5", "--resume", "--betas", "0.8", "0.9"])
    command = config.command_line("training.stage1_align")
    assert command.startswith("python -m training.stage1_align ") and "--lr 5e-05" in command
    assert "--resume" in command and "--betas 0.8 0.9" in command and "--seed" not in command  # defaults left out
    assert parse_config(Stage1Config, command.split()[3:]) == config


def test_accumulation_keeps_the_global_batch_on_any_device_count():
    config = TrainConfig(global_batch_size=256, batch_size=32)
    assert [config.accumulation_steps(world) for world in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="not a multiple"):
        config.accumulation_steps(3)


def test_learning_rate_warms_up_then_follows_a_cosine():
    factors = [lr_factor(step, 100, 10, "cosine", 0.1) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(factors[:10]))
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert {lr_factor(step, 100, 0, "constant", 0.0) for step in range(100)} == {1.0}


def test_each_optimizer_step_deals_disjoint_micro_batches_to_the_ranks():
    size, micro, world, accumulation = 50, 2, 2, 3  # 12 samples per step → 4 whole steps, 2 left out
    per_rank = [epoch_batches(size, micro, world, accumulation, seed=7, epoch=0, rank=rank) for rank in range(world)]
    assert [len(batches) for batches in per_rank] == [4 * accumulation] * world
    for step in range(4):
        taken = [i for rank in range(world) for batch in per_rank[rank][step * 3 : step * 3 + 3] for i in batch]
        assert len(taken) == len(set(taken)) == 12
    everything = [i for batches in per_rank for batch in batches for i in batch]
    assert len(set(everything)) == 48
    assert epoch_batches(size, micro, world, accumulation, 7, 0, 0) == per_rank[0]  # reproducible
    assert epoch_batches(size, micro, world, accumulation, 7, 1, 0) != per_rank[0]  # reshuffled per epoch
