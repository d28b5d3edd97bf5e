"""What the multimodal stages (1 and 2) give the generic training loop: positions, samples, weights, card.

Both stages train a `MultimodalPhi` on LLaVA-style conversations and publish a weights folder; they
differ in the model they build and the parameters they train. `multimodal_stage` turns those into the
`TrainingJob` the loop takes, with everything else shared: how a batch's positions are counted, greedy answers
to held-out conversations as samples, the one place a stage's manifest is written, and its model card.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from inference.cards import weights_card
from inference.cli import UsageError
from inference.config import GenerationOptions, Manifest
from inference.loading import save_weights
from inference.model import MultimodalPhi
from inference.prompt import Conversation, Turn
from training.data import Collator, Example
from training.trainer import SAMPLE_TOKENS, TrainingJob, to_device

# The data sets named on the cards: COCO 2017 captions as the Hub hosts them (stage 1 itself reads the
# official zips: prepare_coco) and LLaVA-Instruct-150K (stage 2).
COCO_DATASETS = ("lmms-lab/COCO-Caption2017",)
INSTRUCT_DATASETS = ("liuhaotian/LLaVA-Instruct-150K",)


def count_positions(batch: dict[str, Any]) -> int:
    """Positions the language model processes for a batch: every token and image patch position."""
    return sum(len(ids) for ids in batch["input_ids"])


def conversation_samples(
    model: MultimodalPhi, collator: Collator, examples: list[Example], count: int
) -> list[dict[str, Any]]:
    """Greedy answers to the last question of the first held-out conversations (with their images)."""
    options = GenerationOptions(max_new_tokens=SAMPLE_TOKENS)
    records = []
    for example in examples[:count]:
        turns = example.conversation.turns
        question = Conversation((*turns[:-1], Turn(turns[-1].question)), example.conversation.has_image)
        prompt = collator.render(question, add_generation_prompt=True)
        image_embeds = None
        if example.image is not None:
            batch = to_device(collator([example]), model.device)
            image_embeds = model.encode_images(batch.get("pixel_values"), image_features=batch.get("image_features"))
        tokens = model.generate(prompt.input_ids, image_embeds, options)
        answer = collator.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        records.append({"id": example.id, "reference": turns[-1].answer, "generated": answer})
    return records


def multimodal_stage(
    model: MultimodalPhi,
    manifest: Manifest,
    param_groups: list[dict[str, Any]],
    collator: Collator,
    train: list[Example],
    held_out: list[Example],
    training: dict[str, Any],
    datasets: tuple[str, ...],
) -> TrainingJob:
    """The loop's `TrainingJob` for a multimodal stage whose weights folder `manifest` describes.

    `training` (stage name, command) is recorded in the saved manifest with the run summary; the
    language model's adapter is saved when the manifest says there is one. Examples are fitted to the
    collator's position budget, which may not pass the language model's context.
    """
    context = model.language_model.config.max_position_embeddings
    if collator.max_length > context:
        raise UsageError(f"--max-length {collator.max_length} is over the language model's context of {context}")
    train, held_out = collator.fit(train, "train"), collator.fit(held_out, "eval")

    def save(model: MultimodalPhi, folder: Path, summary: dict[str, Any]) -> None:
        adapter = model.language_model if manifest.adapter else None
        published = replace(manifest, training={**training, **summary})
        save_weights(folder, published, model.projector, adapter_model=adapter)

    def sample(model: MultimodalPhi, count: int) -> list[dict[str, Any]]:
        return conversation_samples(model, collator, held_out, count)

    return TrainingJob(
        model,
        param_groups,
        collator,
        train,
        held_out,
        save_weights=save,
        card=lambda folder, summary: weights_card(folder, summary, datasets),
        count_tokens=count_positions,
        sample=sample,
    )
