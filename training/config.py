"""Typed training configuration: dataclass fields become CLI flags; a YAML file can set them too.

Precedence: dataclass defaults < `--config FILE.yaml` < command-line flags. The resolved config is
saved as `config.yaml` beside every checkpoint, so a run can always be read back and repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from inference.cli import ArgumentParser, UsageError
from inference.config import atomic_write_text
from inference.hub import parse_reference


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its CLI help text (lists are copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    """What every stage shares: output, schedule, precision, logging and checkpoints."""

    output_dir: str = option("runs/train", "checkpoints, logs, plots and the final weights go here")
    seed: int = option(0, "seed for initialisation, data order and sampling")
    epochs: float = option(1.0, "passes over the training data (ignored when --max-steps > 0)")
    max_steps: int = option(0, "optimizer steps to run; 0 = derive from --epochs")
    global_batch_size: int = option(256, "samples per optimizer step, over all devices and accumulation")
    batch_size: int = option(32, "samples per device per forward (micro-batch)")
    lr: float = option(1e-3, "peak learning rate")
    lr_schedule: Literal["cosine", "constant"] = option("cosine", "after warmup: cosine decay or constant")
    min_lr_ratio: float = option(0.0, "cosine decays to lr × this")
    warmup_ratio: float = option(0.03, "fraction of the steps spent warming up linearly from 0")
    warmup_steps: int = option(-1, "optimizer steps of linear warmup; -1 = use --warmup-ratio instead")
    weight_decay: float = option(0.0, "AdamW weight decay")
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = option(
        "adamw", "torch AdamW, or bitsandbytes' 8-bit AdamW (paged: spills optimizer state to CPU memory on GPUs)"
    )
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this; 0 = no clipping")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", "auto = bf16 where the GPU supports it, fp16 on other GPUs, fp32 on the CPU"
    )
    log_every: int = option(10, "optimizer steps between CSV log rows")
    eval_every: int = option(200, "optimizer steps between held-out evaluations (and loss plots)")
    eval_batches: int = option(20, "micro-batches of held-out data per evaluation; 0 = all")
    samples: int = option(3, "held-out examples to generate for at each evaluation")
    save_every: int = option(500, "optimizer steps between checkpoints")
    num_workers: int = option(2, "data-loading worker processes per device")
    resume: bool = option(False, "continue from output_dir/checkpoint exactly where it stopped")
    push_to_hub: str = option("", "Hub repo id (OWNER/NAME) to push the final weights folder to; empty = no push")
    hub_private: bool = option(False, "create the Hub repo as private")
    push_checkpoints: bool = option(False, "with --push-to-hub: also push the weights at every checkpoint")

    def __post_init__(self) -> None:
        positive = ("global_batch_size", "batch_size", "lr", "log_every", "eval_every", "save_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        if self.max_steps < 0 or (self.epochs <= 0 and self.max_steps == 0):
            raise UsageError("give a positive --max-steps or --epochs")
        if not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UsageError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < -1:
            raise UsageError(f"--warmup-steps must be -1 (use --warmup-ratio) or ≥ 0, got {self.warmup_steps}")
        self.betas = tuple(self.betas)
        if self.push_to_hub and parse_reference(self.push_to_hub) is None:
            raise UsageError(f"--push-to-hub {self.push_to_hub!r} is not a Hub repo id (expected OWNER/NAME)")

    def warmup_for(self, total_steps: int) -> int:
        """Linear-warmup length in optimizer steps: --warmup-steps when ≥ 0, else --warmup-ratio of the run."""
        return self.warmup_steps if self.warmup_steps >= 0 else round(self.warmup_ratio * total_steps)

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each device, so that the global batch is what was asked."""
        per_step = self.batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of batch_size {self.batch_size} × "
                f"{world_size} device(s)"
            )
        return self.global_batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return {name: (list(value) if isinstance(value, tuple) else value) for name, value in vars(self).items()}

    def command_line(self, module: str) -> str:
        """The shell command that runs `module` with this config: every field that differs from its default."""
        args = ["python", "-m", module]
        for item in dataclasses.fields(self):
            value, default = getattr(self, item.name), _default(item)
            if value == default or (isinstance(value, tuple) and list(value) == list(default)):
                continue
            if isinstance(value, bool):
                args.append(flag(item.name) if value else f"--no-{flag(item.name)[2:]}")
            elif isinstance(value, list | tuple):
                args += [flag(item.name), *map(str, value)]
            else:
                args += [flag(item.name), str(value)]
        return shlex.join(args)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / "config.yaml"
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


@dataclass
class ImageTextConfig(TrainConfig):
    """The data fields of the multimodal stages: LLaVA-style JSON files and where their images are."""

    train_data: str = option("", "LLaVA-style JSON for training (captions for stage 1, conversations for stage 2)")
    eval_data: str = option("", "held-out data in the same format; empty = no evaluation")
    image_folder: str = option("", "folder the records' image paths are relative to")
    feature_cache: str = option("", "feature cache folder from training.cache_features; empty = run the tower")
    max_length: int = option(2048, "position limit per example (an image counts as its patch positions)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.train_data:
            raise UsageError("--train-data is required")
        if not (self.image_folder or self.feature_cache):
            raise UsageError("give --image-folder, --feature-cache, or both")
        if self.max_length <= 0:
            raise UsageError(f"--max-length must be positive, got {self.max_length}")


C = TypeVar("C", bound=TrainConfig)


def flag(name: str) -> str:
    """A config field's command-line flag: `warmup_ratio` → `--warmup-ratio`."""
    return "--" + name.replace("_", "-")


def _default(item: dataclasses.Field) -> Any:
    return item.default_factory() if item.default is dataclasses.MISSING else item.default


def parse_config(cls: type[C], argv: list[str] | None, description: str | None = None) -> C:
    """Build `cls` from defaults, an optional `--config` YAML file and command-line flags."""
    hints = typing.get_type_hints(cls)
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, help="YAML file of field: value pairs (flags override it)")
    for item in dataclasses.fields(cls):
        kwargs = _argument(hints[item.name])
        parser.add_argument(
            flag(item.name), dest=item.name, default=argparse.SUPPRESS, help=item.metadata.get("help"), **kwargs
        )
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config")
    if config_file is not None:
        values.update(_typed_yaml(config_file, parser, {item.name for item in dataclasses.fields(cls)}))
    values.update(args)
    try:
        return cls(**values)
    except TypeError as error:
        raise UsageError(str(error)) from None


def _typed_yaml(path: Path, parser: argparse.ArgumentParser, fields: set[str]) -> dict[str, Any]:
    """A YAML config's values, converted and checked exactly as the same flags would be.

    YAML 1.1 reads `lr: 1e-3` as a string; going through the flags' own types and choices makes it 0.001
    and refuses what the command line would refuse, before any model is loaded.
    """
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise UsageError(f"{path} must hold field: value pairs")
    unknown = sorted(set(loaded) - fields)
    if unknown:
        raise UsageError(f"{path} has unknown fields {unknown}; valid fields: {sorted(fields)}")
    tokens, empty_lists = [], {}
    for name, value in loaded.items():
        if isinstance(value, bool):
            tokens.append(flag(name) if value else f"--no-{flag(name)[2:]}")
        elif isinstance(value, list | tuple):
            if value:
                tokens += [flag(name), *map(str, value)]
            else:
                empty_lists[name] = []  # nothing to convert
        else:
            tokens += [flag(name), str(value)]
    try:
        converted = vars(parser.parse_args(tokens))
    except UsageError as error:
        raise UsageError(f"{path}: {error}") from None
    converted.pop("config")  # a config file does not name another
    return converted | empty_lists


def _argument(hint: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"choices": list(args), "type": type(args[0])}
    if origin is tuple:
        return {"nargs": len(args), "type": args[0]}
    if origin is list:
        return {"nargs": "+", "type": args[0]}
    if hint in (int, float, str):
        return {"type": hint}
    raise TypeError(f"no command-line form for {hint}")
