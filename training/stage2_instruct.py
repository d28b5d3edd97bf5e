"""Stage 2: QLoRA instruction tuning of phi-2 and the projector on LLaVA-style conversations.

phi-2 in 4-bit NF4 with double quantisation (bitsandbytes), prepared for k-bit training, a LoRA on
q_proj, k_proj, v_proj, dense, fc1 and fc2, and the stage-1 projector trained at its own learning
rate. Every assistant turn is supervised with its `<|endoftext|>`, every user turn masked (the one
template in inference/prompt.py). Defaults follow LLaVA-1.5's LoRA recipe (r 128, alpha 256, LoRA lr
2e-4, projector lr 2e-5, global batch 128, warmup 3 %, cosine, 1 epoch);
`training/configs/stage2_original.yaml` reproduces the original project's settings.

One GPU:
    python -m training.stage2_instruct --stage1-weights runs/stage1/weights \
        --train-data data/llava/llava_instruct_150k.json --image-folder data/coco \
        --feature-cache data/coco/features --output-dir runs/stage2
Several GPUs (same flags):
    accelerate launch --num_processes 4 -m training.stage2_instruct ...
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import bitsandbytes
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from inference.cli import UsageError, command
from inference.config import Manifest, TemplateName
from inference.dimensions import PHI_LORA_MODULES
from inference.loading import build_model, resolve_model_reference
from inference.model import MultimodalPhi
from training.config import ImageTextConfig, option, parse_config
from training.data import load_splits, stage_collator
from training.feature_shards import open_cache
from training.multimodal import INSTRUCT_DATASETS, multimodal_stage
from training.optim import make_accelerator, precision_dtype, resolve_precision
from training.trainer import Trainer

MODULE = "training.stage2_instruct"


@dataclass
class Stage2Config(ImageTextConfig):
    output_dir: str = option("runs/stage2", "checkpoints, logs, plots and the final weights folder go here")
    stage1_weights: str = option("", "weights folder from stage 1: base models, feature layer and projector")
    lr: float = option(2e-4, "peak learning rate of the LoRA weights")
    projector_lr: float = option(2e-5, "peak learning rate of the projector")
    global_batch_size: int = option(128, "samples per optimizer step, over all devices and accumulation")
    batch_size: int = option(16, "samples per device per forward (micro-batch)")
    lora_r: int = option(128, "LoRA rank")
    lora_alpha: int = option(256, "LoRA scale numerator (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    lora_modules: list[str] = option(PHI_LORA_MODULES, "linear layers that get a LoRA")
    quantize: bool = option(True, "load phi-2 in 4-bit NF4 with double quantisation (QLoRA); --no-quantize = LoRA")
    gradient_checkpointing: bool = option(True, "recompute activations in the backward pass to save memory")
    name: str = option("stage2-qlora", "name recorded in the weights manifest")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.stage1_weights:
            raise UsageError("--stage1-weights is required")
        for name in ("lora_r", "projector_lr"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


def load_language_model(reference: str, config: Stage2Config, precision: str, device: torch.device) -> PeftModel:
    """phi-2 (4-bit NF4 unless --no-quantize), prepared for training, with a fresh LoRA."""
    dtype = precision_dtype(precision)
    checkpointing = {"use_reentrant": False}
    if config.quantize:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(
            reference, quantization_config=quantization, dtype=dtype, device_map={"": device}
        )
        # peft's own checkpointing switch calls transformers' deprecated gradient_checkpointing_enable;
        # with use_reentrant=False it adds nothing else, so checkpointing is switched on here instead.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if config.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        if device.type == "cpu":
            keep_training_layout(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(reference, dtype=dtype).requires_grad_(False)
        if config.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
            model.enable_input_require_grads()
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def keep_training_layout(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during evaluation.

    On CPUs with AVX-512 BF16, bitsandbytes 0.50 repacks a Linear4bit's weight the first time it runs
    in eval mode without gradients, and never packs it back: the next training step then fails in the
    backward pass. Training runs evaluate between steps, so they keep the training layout throughout.
    """
    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def instruct_manifest(config: Stage2Config) -> Manifest:
    """The manifest of the weights this stage writes: the stage-1 folder's base models (references made
    absolute, as the new weights live elsewhere), feature layer and projector, the chat template, an adapter."""
    folder = Path(config.stage1_weights)
    stage1 = Manifest.load(folder)
    return replace(
        stage1,
        name=config.name,
        language_model=resolve_model_reference(folder, stage1.language_model),
        vision_model=resolve_model_reference(folder, stage1.vision_model),
        template=TemplateName.PHI2_CHAT,
        adapter=True,
        training={},
    )


def build(config: Stage2Config, manifest: Manifest, precision: str, device: torch.device) -> tuple[MultimodalPhi, Any]:
    """`manifest`'s models (from `instruct_manifest`), with phi-2 wrapped for (Q)LoRA and the stage-1 projector
    made trainable."""
    folder = Path(config.stage1_weights)  # where the stage-1 projector is read
    model, tokenizer = build_model(
        manifest, folder, lambda reference: load_language_model(reference, config, precision, device)
    )
    model.projector.requires_grad_(True)
    return model, tokenizer


def run(config: Stage2Config) -> dict[str, Any]:
    """Instruction-tune as `config` says; returns the run summary (weights in output_dir/weights)."""
    accelerator = make_accelerator(config)
    manifest = instruct_manifest(config)
    cache = open_cache(config.feature_cache, manifest.vision_model, manifest.vision_feature_layer, config.image_folder)
    train, held_out = load_splits(config, cache)
    model, tokenizer = build(config, manifest, resolve_precision(config.mixed_precision), accelerator.device)
    collator = stage_collator(config, TemplateName.PHI2_CHAT, tokenizer, cache, model.vision_tower)
    param_groups = [
        {"params": [p for p in model.language_model.parameters() if p.requires_grad], "lr": config.lr},
        {"params": list(model.projector.parameters()), "lr": config.projector_lr},
    ]
    training = {"stage": "stage2_instruct", "command": config.command_line(MODULE)}
    stage = multimodal_stage(model, manifest, param_groups, collator, train, held_out, training, INSTRUCT_DATASETS)
    return Trainer(config, stage, accelerator).fit()


@command
def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_config(Stage2Config, argv, __doc__))


if __name__ == "__main__":
    main()
