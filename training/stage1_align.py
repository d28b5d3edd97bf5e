"""Stage 1: align TinyCLIP to phi-2 by training only the projector on image captions.

Frozen vision tower and language model; one teacher-forced forward per batch, every caption supervised
with its `<|endoftext|>` (the `plain` template); output: a weights folder that `inference` serves.
Defaults follow LLaVA-1.5's stage 1 (mlp2x_gelu, lr 1e-3, global batch 256, warmup 3 %, cosine, 1
epoch); `training/configs/stage1_original.yaml` reproduces the original project's settings.

One GPU:
    python -m training.stage1_align --train-data data/coco/llava/coco_captions_train2017.json \
        --eval-data data/coco/llava/coco_captions_val2017.json --image-folder data/coco \
        --feature-cache data/coco/features --output-dir runs/stage1
Several GPUs (same flags; the global batch stays 256, accumulation adapts):
    accelerate launch --num_processes 4 -m training.stage1_align ...   # or: torchrun --nproc_per_node 4 -m ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from inference.cli import command
from inference.config import PHI2_ID, TINYCLIP_ID, Manifest, TemplateName
from inference.loading import build_model, new_manifest, pretrained
from inference.model import MultimodalPhi
from training.config import ImageTextConfig, option, parse_config
from training.data import load_splits, stage_collator
from training.feature_shards import open_cache
from training.multimodal import COCO_DATASETS, multimodal_stage
from training.optim import make_accelerator, precision_dtype, resolve_precision
from training.trainer import Trainer

MODULE = "training.stage1_align"


@dataclass
class Stage1Config(ImageTextConfig):
    output_dir: str = option("runs/stage1", "checkpoints, logs, plots and the final weights folder go here")
    language_model: str = option(PHI2_ID, "Hub id or folder of the frozen language model")
    vision_model: str = option(TINYCLIP_ID, "Hub id or folder of the frozen CLIP vision model")
    vision_feature_layer: int = option(-2, "hidden state fed to the projector: -2 penultimate (LLaVA), -1 last")
    projector: Literal["mlp2x_gelu", "linear"] = option("mlp2x_gelu", "projector architecture")
    max_length: int = option(128, "position limit per caption (the image counts as its 49 patch positions)")
    name: str = option("stage1-projector", "name recorded in the weights manifest")


def build(config: Stage1Config, precision: str) -> tuple[MultimodalPhi, Any, Manifest]:
    """Frozen tokenizer, language model and vision tower from the config's ids, and a new projector."""
    manifest = new_manifest(
        config.name,
        config.language_model,
        config.vision_model,
        config.vision_feature_layer,
        config.projector,
        TemplateName.PLAIN,
    )
    frozen = pretrained(precision_dtype(precision))
    # The new projector is seeded by make_accelerator: identical on every rank.
    model, tokenizer = build_model(manifest, None, lambda reference: frozen(reference).requires_grad_(False))
    return model, tokenizer, manifest


def run(config: Stage1Config) -> dict[str, Any]:
    """Train the projector as `config` says; returns the run summary (weights in output_dir/weights)."""
    accelerator = make_accelerator(config)
    cache = open_cache(config.feature_cache, config.vision_model, config.vision_feature_layer, config.image_folder)
    train, held_out = load_splits(config, cache)
    model, tokenizer, manifest = build(config, resolve_precision(config.mixed_precision))
    collator = stage_collator(config, TemplateName.PLAIN, tokenizer, cache, model.vision_tower)
    parameters = [{"params": list(model.projector.parameters()), "lr": config.lr}]
    training = {"stage": "stage1_align", "command": config.command_line(MODULE)}
    stage = multimodal_stage(model, manifest, parameters, collator, train, held_out, training, COCO_DATASETS)
    return Trainer(config, stage, accelerator).fit()


@command
def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_config(Stage1Config, argv, __doc__))


if __name__ == "__main__":
    main()
