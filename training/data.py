"""LLaVA-style conversation data → batches of token ids, labels and image features (cached) or pixels.

The conversation → ids/labels rule is `inference.prompt.render`, the same one serving uses.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from inference.cli import UsageError
from inference.config import TemplateName
from inference.prompt import Conversation, Rendered, render
from inference.vision import VisionTower, load_image, preprocess
from training.config import ImageTextConfig
from training.feature_shards import FeatureCache, FeatureCacheError


class DataError(UsageError):
    """A data file or corpus that cannot be used as given; the message names the file or source and why."""


@dataclass(frozen=True)
class Example:
    id: str
    conversation: Conversation
    image: str | None  # path relative to the image folder (and the key in the feature cache)


@dataclass(frozen=True)
class FittedExample(Example):
    """An example as `Collator.fit` kept it, with its rendering (int32, so a large data set stays small in
    memory): a training run renders each conversation once, not once per epoch."""

    input_ids: np.ndarray = field(default=None, compare=False, repr=False)
    labels: np.ndarray = field(default=None, compare=False, repr=False)


def load_examples(path: str | Path) -> tuple[list[Example], Counter]:
    """Read a LLaVA-style JSON list; malformed records are skipped and counted by reason."""
    records = read_json_list(path)
    examples, skipped = [], Counter()
    for number, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise ValueError("record is not an object")
            conversation = Conversation.from_llava(record)
        except ValueError as error:
            skipped[str(error)] += 1
            continue
        image = record.get("image") or None
        examples.append(Example(str(record.get("id", number)), conversation, image))
    return examples, skipped


def read_json_list(path: str | Path) -> list:
    """A data file's JSON list of records, or a `DataError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a JSON list of records")
    return records


def images_of(data_files: list[Path]) -> list[str]:
    """Every image the data files name, once, sorted."""
    images = set()
    for path in data_files:
        images.update(
            record["image"] for record in read_json_list(path) if isinstance(record, dict) and record.get("image")
        )
    return sorted(images)


def drop_failed_images(examples: list[Example], cache: FeatureCache) -> tuple[list[Example], int]:
    """Leave out examples whose image the cache could not read; refuse images the cache never saw."""
    kept = [example for example in examples if example.image not in cache.failed]
    missing = sorted({example.image for example in kept if example.image is not None and example.image not in cache})
    if missing:
        raise FeatureCacheError(
            f"{len(missing)} images are not in the feature cache {cache.folder} (first: {missing[0]}); "
            "run cache_features over this data file"
        )
    return kept, len(examples) - len(kept)


def load_split(path: str | Path, cache: FeatureCache | None, label: str) -> list[Example]:
    """Examples of one data file, minus malformed records and unreadable images, each reported with a count."""
    examples, malformed = load_examples(path)
    failed = 0
    if cache is not None:
        examples, failed = drop_failed_images(examples, cache)
    if malformed:
        reasons = "; ".join(f"{count} × {reason}" for reason, count in malformed.most_common(3))
        tqdm.write(f"{label}: skipped {sum(malformed.values())} malformed records ({reasons})")
    if failed:
        tqdm.write(f"{label}: skipped {failed} records whose image could not be read")
    return examples


class Collator:
    """Examples → {'input_ids', 'labels', and 'image_features' or 'pixel_values'} for `MultimodalPhi`.

    `max_length` counts positions, an image as its `image_tokens` patch positions, as the model sees them.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: TemplateName,
        max_length: int,
        image_tokens: int,
        image_size: int,
        image_folder: str | Path | None = None,
        cache: FeatureCache | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.image_tokens = image_tokens  # positions per image: the vision tower's patch count
        self.image_size = image_size  # pixels per side the vision tower takes
        self.image_folder = Path(image_folder) if image_folder else None
        self.cache = cache

    def render(self, conversation: Conversation, add_generation_prompt: bool = False) -> Rendered:
        """The conversation as this stage renders it, the image as its patch positions."""
        return render(
            self.template, conversation, self.tokenizer, add_generation_prompt, image_tokens=self.image_tokens
        )

    def fit(self, examples: list[Example], label: str) -> list[FittedExample]:
        """The examples within `max_length`, each whole answer ending with its end token, with their rendering.

        A longer conversation keeps its first turns that fit (never half an answer); one whose first turn
        does not fit is dropped. Both are counted and reported.
        """
        kept, trimmed, dropped = [], 0, 0
        for example in tqdm(examples, desc=f"{label}: lengths", unit="example", disable=len(examples) < 20_000):
            conversation = example.conversation
            turns = len(conversation.turns)
            rendered = self.render(conversation)
            while turns and len(rendered.input_ids) > self.max_length:
                turns -= 1
                if turns:
                    rendered = self.render(replace(conversation, turns=conversation.turns[:turns]))
            if turns == 0:
                dropped += 1
                continue
            if turns < len(conversation.turns):
                trimmed += 1
                conversation = replace(conversation, turns=conversation.turns[:turns])
            ids, labels = (np.array(values, dtype=np.int32) for values in (rendered.input_ids, rendered.labels))
            kept.append(FittedExample(example.id, conversation, example.image, ids, labels))
        if trimmed or dropped:
            tqdm.write(
                f"{label}: {trimmed} conversations cut to their first whole turns and {dropped} dropped "
                f"(a first turn over {self.max_length} positions)"
            )
        return kept

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        input_ids, labels = [], []
        for example in examples:
            if isinstance(example, FittedExample):
                rendered = Rendered(example.input_ids.tolist(), example.labels.tolist())
            else:
                rendered = self.render(example.conversation)
            if len(rendered.input_ids) > self.max_length:
                raise ValueError(
                    f"example {example.id} has {len(rendered.input_ids)} positions, over max_length "
                    f"{self.max_length}: pass the examples through Collator.fit first"
                )
            input_ids.append(rendered.input_ids)
            labels.append(rendered.labels)
        images = [example.image for example in examples if example.image is not None]
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels}
        if images and self.cache is not None:
            batch["image_features"] = self.cache.stack(images)
        elif images:
            batch["pixel_values"] = preprocess([self.load_image(image) for image in images], self.image_size)
        return batch

    def load_image(self, image: str) -> Image.Image:
        if self.image_folder is None:
            raise ValueError("examples have images but no image folder (or feature cache) was given")
        return load_image(self.image_folder / image)


def load_splits(config: ImageTextConfig, cache: FeatureCache | None) -> tuple[list[Example], list[Example]]:
    """A stage's training and held-out examples, read (and checked) before any model is loaded."""
    train = load_split(config.train_data, cache, "train")
    held_out = load_split(config.eval_data, cache, "eval") if config.eval_data else []
    return train, held_out


def stage_collator(
    config: ImageTextConfig,
    template: TemplateName,
    tokenizer: PreTrainedTokenizerBase,
    cache: FeatureCache | None,
    vision_tower: VisionTower,
) -> Collator:
    """The collator of a stage's config, for the vision tower's images."""
    image_folder = config.image_folder or None
    image_tokens, image_size = vision_tower.num_patches, vision_tower.image_size
    return Collator(tokenizer, template, config.max_length, image_tokens, image_size, image_folder, cache)
