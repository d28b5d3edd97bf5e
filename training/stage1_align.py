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
from pathlib import Path
from typing import Any, Literal

from transformers import AutoModelForCausalLM, AutoTokenizer

from inference.config import PHI2_ID, TINYCLIP_ID, Manifest, ProjectorConfig, ProjectorType, TemplateName
from inference.loading import save_weights
from inference.model import MultimodalPhi
from inference.projector import build_projector
from inference.vision import VisionTower
from training.config import ImageTextConfig, command_line, option, parse_config
from training.data import stage_data
from training.feature_cache import open_cache
from training.trainer import Stage, Trainer, make_accelerator, precision_dtype, resolve_precision


@dataclass
class Stage1Config(ImageTextConfig):
    output_dir: str = option("runs/stage1", "checkpoints, logs, plots and the final weights folder go here")
    language_model: str = option(PHI2_ID, "Hub id or folder of the frozen language model")
    vision_model: str = option(TINYCLIP_ID, "Hub id or folder of the frozen CLIP vision model")
    vision_feature_layer: int = option(-2, "hidden state fed to the projector: -2 penultimate (LLaVA), -1 last")
    projector: Literal["mlp2x_gelu", "linear"] = option("mlp2x_gelu", "projector architecture")
    max_length: int = option(128, "token limit per caption (the image counts as one)")
    name: str = option("stage1-projector", "name recorded in the weights manifest")


# COCO 2017 captions as the Hub hosts them (the run itself reads the official zips: prepare_coco).
COCO_DATASETS = ("lmms-lab/COCO-Caption2017",)


def build_model(config: Stage1Config, precision: str) -> tuple[MultimodalPhi, Any, ProjectorConfig]:
    """Frozen tokenizer, language model and vision tower from the config's ids, and a new projector."""
    tokenizer = AutoTokenizer.from_pretrained(config.language_model)
    language_model = AutoModelForCausalLM.from_pretrained(config.language_model, dtype=precision_dtype(precision))
    language_model.requires_grad_(False)
    tower = VisionTower.from_pretrained(config.vision_model, config.vision_feature_layer)
    projector_config = ProjectorConfig(ProjectorType(config.projector), tower.width, language_model.config.hidden_size)
    projector = build_projector(projector_config)  # seeded by make_accelerator: identical on every rank
    return MultimodalPhi(tower, projector, language_model, tokenizer.eos_token_id), tokenizer, projector_config


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_config(Stage1Config, argv, __doc__)
    accelerator = make_accelerator(config)
    model, tokenizer, projector_config = build_model(config, resolve_precision(config.mixed_precision))
    cache = open_cache(config.feature_cache, config.vision_model, config.vision_feature_layer)
    train, evaluation, collator = stage_data(
        config, TemplateName.PLAIN, tokenizer, cache, model.vision_tower.image_size
    )

    def save(model: MultimodalPhi, folder: Path, summary: dict[str, Any]) -> None:
        manifest = Manifest(
            name=config.name,
            language_model=config.language_model,
            vision_model=config.vision_model,
            vision_feature_layer=config.vision_feature_layer,
            image_tokens=model.vision_tower.num_patches,
            projector=projector_config,
            template=TemplateName.PLAIN,
            adapter=False,
            training={"stage": "stage1_align", "command": command_line("training.stage1_align", argv), **summary},
        )
        save_weights(folder, manifest, model.projector)

    parameters = [{"params": list(model.projector.parameters()), "lr": config.lr}]
    stage = Stage(model, parameters, collator, train, evaluation, save, datasets=COCO_DATASETS)
    return Trainer(config, stage, accelerator).fit()


if __name__ == "__main__":
    main()
