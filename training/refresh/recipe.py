"""Refresh recipes (training/recipes/*.yaml): what `training.refresh` trains, on what, and its estimates.

A recipe names the data (`coco-llava`: COCO 2017 + LLaVA-Instruct-150K; `shapes`: the synthetic set of
`training.shapes`), the base models (Hub ids, or `tiny` for the tiny stand-ins built on the spot),
each stage's config fields (`Stage1Config`, `Stage2Config`; the conductor sets the paths), evaluation,
the GGUF export and the part-1 pretraining recipe. `estimates` feed `--plan` where no stage has been
measured yet; they are labelled as estimates wherever they are printed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from inference.cli import UsageError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # training/recipes/
DEFAULT_RECIPE = RECIPES / "phi2.yaml"
BUILT_HERE = "tiny"  # as language_model and vision_model: tiny stand-ins built by the models stage
REFERENCE_TFLOPS = 312.0  # the estimates are for one A100 (dense bf16 peak)


@dataclass
class Recipe:
    name: str
    data: Literal["coco-llava", "shapes"]
    language_model: str  # a Hub id, or "tiny" (BUILT_HERE)
    vision_model: str
    vision_feature_layer: int = -2
    held_out: int = 1000  # coco-llava: instruction conversations held out for evaluation
    shapes: dict[str, int] = field(default_factory=dict)  # shapes: train_images, held_out_images, warm_up_steps, ...
    common: dict[str, Any] = field(default_factory=dict)  # YAML anchor for fields the stages share
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    gguf: str = "q8_0"
    merged_dtype: str = "float16"  # the Space's merged weights, as phi-2 ships
    pretrain: str = ""  # part-1 recipe file, for --with-pretrain
    estimates: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise UsageError(
                f"--recipe {path} not found; recipes: {', '.join(sorted(p.name for p in RECIPES.glob('*.yaml')))}"
            )
        data = yaml.safe_load(path.read_text()) or {}
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"{path}: unknown recipe field(s) {', '.join(unknown)}")
        if data.get("data") not in ("coco-llava", "shapes"):
            raise UsageError(f"{path}: data must be coco-llava or shapes, got {data.get('data')!r}")
        if (data.get("language_model") == BUILT_HERE) != (data.get("vision_model") == BUILT_HERE):
            raise UsageError(f"{path}: language_model and vision_model are both {BUILT_HERE!r} (built here) or neither")
        for stage in ("stage1", "stage2"):
            paths = {"output_dir", "train_data", "eval_data", "image_folder", "feature_cache", "stage1_weights"}
            if paths & set(data.get(stage) or {}):
                raise UsageError(f"{path}: {stage} may not set {', '.join(sorted(paths & set(data[stage])))}")
        return cls(**data, path=str(path))

    @property
    def built_here(self) -> bool:
        """Whether the base models are the tiny stand-ins built by the models stage (not Hub downloads)."""
        return self.language_model == BUILT_HERE


@dataclass
class PretrainRecipe:
    sources: list[str]  # prepare_text sources; ["shapes"] = the tiny recipe's own text
    config: str  # PretrainConfig YAML
    weights: list[str] = field(default_factory=list)
    max_tokens: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> PretrainRecipe:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"pretraining recipe {path} not found")
        return cls(**(yaml.safe_load(path.read_text()) or {}))


@dataclass(frozen=True)
class Gpus:
    count: int
    name: str  # "" on a CPU
    memory_gb: float
    tflops: float | None  # one device's dense bf16 peak, when known

    @classmethod
    def detect(cls) -> Gpus:
        if not torch.cuda.is_available():
            return cls(0, "", 0.0, None)
        from training.optim import gpu_peak_tflops

        name = torch.cuda.get_device_name(0)
        tflops = gpu_peak_tflops(name)
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        return cls(torch.cuda.device_count(), name, round(memory, 1), tflops)

    def describe(self) -> str:
        if not self.count:
            return "no GPU (CPU only)"
        return f"{self.count} × {self.name} ({self.memory_gb:.0f} GiB each)"

    @property
    def speed(self) -> float:
        """Relative to the one A100 the estimates are for: bf16 peak × GPUs (optimistic for memory-bound work)."""
        if not self.count:
            return 1.0  # a CPU: the tiny recipe's estimates are for a CPU of 2 cores
        return self.count * (self.tflops or REFERENCE_TFLOPS) / REFERENCE_TFLOPS
