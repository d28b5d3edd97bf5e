"""The shared training backbone: typed config with YAML and flags, schedule, data order across ranks."""

import itertools
import math
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from inference.cli import UsageError
from training.checkpoint import CHECKPOINT, COMPLETE, OLD, STAGING, recover, rng_state, set_rng_state
from training.config import TrainConfig, parse_config
from training.losses import MAX_BAD_STEPS, TrainingStopped, summed_loss
from training.optim import lr_factor, make_accelerator
from training.stage1_align import Stage1Config
from training.trainer import Trainer, TrainingJob, epoch_batches

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


def test_unknown_yaml_fields_are_refused_with_the_valid_ones(tmp_path):
    (tmp_path / "bad.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(UsageError, match=re.escape("unknown fields ['learning_rate']; valid fields: [")):
        parse_config(Stage1Config, ["--config", str(tmp_path / "bad.yaml"), *REQUIRED])


def test_yaml_values_are_converted_as_flags_are(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; it becomes the float a flag would, and a bad value is refused at once."""
    (tmp_path / "recipe.yaml").write_text("lr: 1e-3\nweight_decay: 1e-2\nmax_grad_norm: 5e-1\nresume: true\n")
    config = parse_config(Stage1Config, ["--config", str(tmp_path / "recipe.yaml"), *REQUIRED])
    assert (config.lr, config.weight_decay, config.max_grad_norm, config.resume) == (1e-3, 1e-2, 0.5, True)
    assert all(type(value) is float for value in (config.lr, config.weight_decay, config.max_grad_norm))
    (tmp_path / "bad.yaml").write_text("weight_decay: lots\n")
    with pytest.raises(UsageError, match=r"bad\.yaml: argument --weight-decay: invalid float value: 'lots'"):
        parse_config(Stage1Config, ["--config", str(tmp_path / "bad.yaml"), *REQUIRED])
    (tmp_path / "choice.yaml").write_text("projector: mlp3x\n")
    with pytest.raises(UsageError, match="invalid choice"):
        parse_config(Stage1Config, ["--config", str(tmp_path / "choice.yaml"), *REQUIRED])


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


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    """Resuming loads checkpoints with weights_only=True: the RNG state must be tensors and plain values."""
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    torch.save(state, tmp_path / "rng.pt")
    random.random(), np.random.rand(), torch.rand(1)  # move every generator on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_warmup_is_capped_at_half_a_short_run_and_says_so(tmp_path, capsys):
    """A 10-step run of a recipe with 2,000 warmup steps warms up over 5 and reaches its learning rate."""
    config = TrainConfig(output_dir=str(tmp_path), max_steps=10, warmup_steps=2000, global_batch_size=1, batch_size=1)
    model = torch.nn.Linear(2, 1)
    groups = [{"params": list(model.parameters()), "lr": config.lr}]
    no_output = dict(save_weights=lambda *args: None, card=lambda *args: "", count_tokens=len)
    stage = TrainingJob(model, groups, list, [0] * 10, [], **no_output)
    trainer = Trainer(config, stage, make_accelerator(config))
    factors = [trainer.scheduler.lr_lambdas[0](step) for step in range(10)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and max(factors) == 1.0
    assert "warmup capped at 5 of this run's 10 steps (2000 asked)" in capsys.readouterr().out


class Quadratic(torch.nn.Module):
    """The smallest model the loop can train: its loss is the squared output (NaN for a NaN input)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=self.linear(x).pow(2).mean())


def quadratic_trainer(output: Path, data: list[float], **settings) -> Trainer:
    config = TrainConfig(output_dir=str(output), global_batch_size=2, batch_size=2, log_every=2, **settings)
    config.num_workers = 0
    model = Quadratic()

    def collate(examples):
        return {"x": torch.tensor(examples).view(-1, 1)}

    def save(model, folder, summary):
        folder.mkdir(parents=True, exist_ok=True)

    stage = TrainingJob(model, [{"params": list(model.parameters())}], collate, data, [], save, lambda *a: "", len)
    return Trainer(config, stage, make_accelerator(config))


def test_a_run_without_held_out_data_still_ends_with_its_loss_plot(tmp_path):
    quadratic_trainer(tmp_path, [1.0] * 12, max_steps=6).fit()
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "weights" / "loss.png").is_file()  # and the published folder carries it


def test_steps_with_a_non_finite_loss_are_skipped_and_counted(tmp_path):
    data = [1.0] * 10 + [math.nan] * 2  # six steps per epoch, one of them holds both NaNs at most
    trainer = quadratic_trainer(tmp_path, data, max_steps=12, lr=1e-2)
    summary = trainer.fit()
    bad = sum(any(math.isnan(data[i]) for i in batch) for batch in epoch_batches(12, 2, 1, 1, 0, 0, 0))
    bad += sum(any(math.isnan(data[i]) for i in batch) for batch in epoch_batches(12, 2, 1, 1, 0, 1, 0))
    assert summary["skipped_steps"] == bad > 0
    assert all(torch.isfinite(p).all() for p in trainer.unwrapped.parameters())  # no NaN reached the weights
    assert math.isfinite(summary["final_train_loss"])


def test_a_run_of_bad_steps_stops_with_a_message(tmp_path):
    trainer = quadratic_trainer(tmp_path, [math.nan] * 20, max_steps=10)
    with pytest.raises(TrainingStopped, match=f"{MAX_BAD_STEPS} steps in a row up to step {MAX_BAD_STEPS}"):
        trainer.fit()


def test_fp16_loss_scaler_state_is_saved_and_restored(tmp_path):
    """accelerate makes a GradScaler only on CUDA; a CPU scaler stands in for it here (the GPU check runs fp16)."""
    trainer = quadratic_trainer(tmp_path, [1.0] * 4, max_steps=2)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    trainer.accelerator.scaler.scale(torch.ones(()))
    trainer.accelerator.scaler.update(2.0**7)  # a scale the run reached after overflows
    trainer.save_checkpoint()
    resumed = quadratic_trainer(tmp_path, [1.0] * 4, max_steps=2, resume=True)
    resumed.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    resumed.load_checkpoint()
    assert resumed.accelerator.scaler.get_scale() == 2.0**7


def whole(folder: Path, step: int) -> Path:
    """A sealed checkpoint folder whose trainer.pt records `step`."""
    folder.mkdir(parents=True)
    torch.save({"step": step}, folder / "trainer.pt")
    (folder / COMPLETE).write_text("")
    return folder


@pytest.mark.parametrize(
    "left, expected",
    [
        ({CHECKPOINT: 2, STAGING: None}, 2),  # killed while writing: the half-written staging goes
        ({CHECKPOINT: 2, STAGING: 3}, 2),  # killed after sealing, before the renames
        ({OLD: 2, STAGING: 3}, 3),  # killed between the two renames
        ({OLD: 2}, 2),  # only the previous one (killed before the staging was sealed, then renamed)
        ({CHECKPOINT: 3, OLD: "partial"}, 3),  # killed while deleting the old one
        ({}, None),
    ],
)
def test_recovery_finds_the_newest_whole_checkpoint_and_clears_leftovers(tmp_path, left, expected):
    for name, step in left.items():
        if step is None:
            (tmp_path / name).mkdir()
            torch.save({"step": 3}, tmp_path / name / "trainer.pt")  # not sealed
        elif step == "partial":
            (tmp_path / name / "sub").mkdir(parents=True)
        else:
            whole(tmp_path / name, step)
    found = recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if expected is None else [CHECKPOINT])
    if expected is not None:
        assert found == tmp_path / CHECKPOINT and torch.load(found / "trainer.pt")["step"] == expected


def test_held_out_loss_weighs_every_supervised_token_alike():
    class MeanOfLabels(torch.nn.Module):  # loss = mean of the supervised labels after the shift
        def forward(self, labels):
            shifted = labels[:, 1:]
            return SimpleNamespace(loss=shifted[shifted != -100].float().mean())

    long, short = torch.tensor([[0, 1, 1, 1, 1]]), torch.tensor([[0, 4, -100, -100, -100]])
    sums = [summed_loss(MeanOfLabels(), {"labels": labels}) for labels in (long, short)]
    assert sum(s for s, _ in sums) / sum(n for _, n in sums) == pytest.approx(8 / 5)  # not (1 + 4) / 2
    assert summed_loss(MeanOfLabels(), {"labels": torch.tensor([[0, -100]])})[1] == 0
