"""One refresh's folder, recipe and options (`Work`), and where each product goes inside the folder.

OUT/data/coco | shapes    images (COCO 2017, or the synthetic shapes)
OUT/data/llava            prepared caption and instruction files (train and held-out)
OUT/data/pope             POPE's question files
OUT/data/features         the vision-feature cache
OUT/models                the base models when built here (tiny recipe, --smoke)
OUT/pretrain              part 1 (--with-pretrain)
OUT/stage1, OUT/stage2    training runs: checkpoint/, log.csv, loss.png, run.json, weights/
OUT/eval                  held-out and benchmark reports
OUT/weights               the Space's weights (adapter merged)
OUT/gguf                  the GGUF pair for llama.cpp
OUT/stages/NAME.json      what each stage measured (time, peak GPU memory, metrics)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.refresh.recipe import Gpus, Recipe

SMOKE_SHAPES = {"train_images": 32, "held_out_images": 8, "warm_up_steps": 0, "clip_width": 64}
SMOKE_TRAINING = dict(
    max_steps=4,
    batch_size=4,
    log_every=1,
    eval_every=2,
    eval_batches=1,
    save_every=2,
    samples=1,
    num_workers=0,
    warmup_ratio=0.25,
)
SMOKE_EVALUATE = {"held_out_limit": 4, "benchmark_limit": 8, "max_new_tokens": 8, "benchmarks": ["pope"]}


@dataclass
class Work:
    """One refresh: its folder, recipe and options, and where every product goes inside the folder."""

    root: Path
    recipe: Recipe
    gpus: Gpus
    seed: int = 0
    resume: bool = False
    smoke: bool = False
    push_to_hub: str = ""
    private: bool = False
    space_weights: Path | None = None
    log: Callable[[str], None] = print
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage, for the summary

    @property
    def shapes_data(self) -> bool:
        """Whether the data is the synthetic shapes (`training.shapes`): the tiny recipe, and every smoke run."""
        return self.smoke or self.recipe.data == "shapes"

    @property
    def shape_settings(self) -> dict[str, int]:
        defaults = {"train_images": 2160, "held_out_images": 90, "warm_up_steps": 400, "clip_width": 64}
        return defaults | (SMOKE_SHAPES if self.smoke else self.recipe.shapes)

    @property
    def images(self) -> Path:
        return self.root / "data" / ("shapes" if self.shapes_data else "coco")

    @property
    def llava(self) -> Path:
        return self.root / "data" / "llava"

    @property
    def pope(self) -> Path:
        return self.root / "data" / "pope"

    @property
    def features(self) -> Path:
        return self.root / "data" / "features"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def language_model(self) -> str:
        return str(self.models / "phi") if self.smoke or self.recipe.built_here else self.recipe.language_model

    @property
    def vision_model(self) -> str:
        return str(self.models / "clip") if self.smoke or self.recipe.built_here else self.recipe.vision_model

    def data_files(self) -> list[Path]:
        return [self.llava / f"coco_captions_{s}2017.json" for s in ("train", "val")] + [
            self.llava / f"instruct_{s}.json" for s in ("train", "val")
        ]

    def training_fields(self, stage: str) -> dict[str, Any]:
        fields = dict(getattr(self.recipe, stage))
        if self.smoke:
            fields |= SMOKE_TRAINING | {"global_batch_size": SMOKE_TRAINING["batch_size"] * max(1, self.gpus.count)}
            fields.pop("epochs", None)
        return fields

    @property
    def evaluate_settings(self) -> dict[str, Any]:
        defaults = {"held_out_limit": 0, "benchmark_limit": 0, "max_new_tokens": 16, "benchmarks": ["pope"]}
        return defaults | (SMOKE_EVALUATE if self.smoke else self.recipe.evaluate)
