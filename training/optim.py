"""Optimizers, learning-rate schedule and mixed precision for the training loop."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from training.config import TrainConfig


def resolve_precision(setting: str) -> str:
    """'auto' → bf16 on GPUs that support it, fp16 on other GPUs, no mixed precision on the CPU."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def precision_dtype(precision: str) -> torch.dtype:
    """Storage dtype for frozen weights under a mixed-precision setting: half the memory, same autocast math."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def build_optimizer(config: TrainConfig, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """torch AdamW, or one of bitsandbytes' 8-bit optimizers (blockwise-quantised moments, 1 byte each).

    `adam8bit` is `bitsandbytes.optim.Adam8bit`, the class the original pretraining run used; bitsandbytes
    applies its weight decay to the weights directly, as AdamW does.
    """
    kwargs = {"betas": config.betas, "weight_decay": config.weight_decay}
    if config.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, **kwargs)
    import bitsandbytes

    optimizers = {
        "adam8bit": bitsandbytes.optim.Adam8bit,
        "adamw8bit": bitsandbytes.optim.AdamW8bit,
        "paged_adamw8bit": bitsandbytes.optim.PagedAdamW8bit,
    }
    if config.optimizer not in optimizers:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; choose adamw or one of {sorted(optimizers)}")
    return optimizers[config.optimizer](param_groups, **kwargs)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_accelerator(config: TrainConfig) -> Accelerator:
    # Without CUDA, cpu=True is what makes accelerate join a torchrun/accelerate-launch group (gloo);
    # otherwise every process would train alone, each believing it is the only one.
    accelerator = Accelerator(
        mixed_precision=resolve_precision(config.mixed_precision), cpu=not torch.cuda.is_available()
    )
    set_seed(config.seed)
    return accelerator


# Dense bf16/fp16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s; matched against the words of the
# device name, first match wins (so "H100 PCIe" before "H100"). Other GPUs: pass --peak-tflops.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("V100", 125.0),
    ("T4", 65.0),
)


def gpu_peak_tflops(device_name: str) -> float | None:
    """A known GPU's dense bf16/fp16 peak in TFLOP/s, from its device name; None if unknown."""
    words = set(re.split(r"[^A-Za-z0-9]+", device_name))
    return next((tflops for model, tflops in GPU_PEAK_TFLOPS if set(model.split()) <= words), None)
