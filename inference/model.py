"""MultimodalPhi: vision tower + projector + causal language model, shared by training and serving.

There is one definition of how images and token ids become `inputs_embeds` and `labels`
(`build_inputs`); the training loss (`forward`) and generation (`generate`, `stream`) both use it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from inference.config import GenerationOptions
from inference.prompt import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from inference.vision import VisionTower


@dataclass
class MultimodalInputs:
    inputs_embeds: torch.Tensor  # (batch, length, width), right-padded with zeros
    attention_mask: torch.Tensor  # (batch, length): 1 for real positions, 0 for padding
    labels: torch.Tensor | None  # (batch, length), IGNORE_INDEX where unsupervised; None when not training


class MultimodalPhi(nn.Module):
    def __init__(
        self,
        vision_tower: VisionTower,
        projector: nn.Module,
        language_model: PreTrainedModel,
        eos_token_id: int,
    ) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.eos_token_id = eos_token_id
        vocab = language_model.get_input_embeddings().num_embeddings
        if not 0 <= eos_token_id < vocab:
            raise ValueError(f"end-of-text id {eos_token_id} is outside the language model's vocabulary ({vocab})")

    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    @property
    def embedding_dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    def encode_images(
        self, pixel_values: torch.Tensor | None = None, *, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pixels (B, 3, H, W), or cached patch features (B, patches, vision width) → (B, patches, text width)."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("give exactly one of pixel_values or image_features")
        if image_features is None:
            image_features = self.vision_tower(pixel_values.to(self.device))
        projector_dtype = next(self.projector.parameters()).dtype
        image_embeds = self.projector(image_features.to(self.device, projector_dtype))
        return image_embeds.to(self.embedding_dtype)

    def build_inputs(
        self,
        input_ids: Sequence[Sequence[int]],
        image_embeds: torch.Tensor | None,
        labels: Sequence[Sequence[int]] | None = None,
    ) -> MultimodalInputs:
        """Splice image embeddings in at each placeholder, in order, and right-pad the batch.

        Every `IMAGE_PLACEHOLDER_ID` consumes the next image of `image_embeds` (B_images, patches, width);
        its label positions become IGNORE_INDEX. Labels stay aligned with inputs; the language model
        shifts them by one when it computes the loss.
        """
        placeholders = sum(list(ids).count(IMAGE_PLACEHOLDER_ID) for ids in input_ids)
        images = 0 if image_embeds is None else image_embeds.shape[0]
        if placeholders != images:
            raise ValueError(
                f"the prompts hold {placeholders} image placeholders but {images} images were given: "
                "each image needs exactly one placeholder"
            )
        if labels is not None and [len(row) for row in labels] != [len(ids) for ids in input_ids]:
            raise ValueError("labels and input_ids must have the same lengths")
        embed_tokens = self.language_model.get_input_embeddings()
        if image_embeds is not None and image_embeds.shape[-1] != embed_tokens.embedding_dim:
            raise ValueError(
                f"image embeddings are {image_embeds.shape[-1]} wide; the language model expects "
                f"{embed_tokens.embedding_dim}"
            )
        next_image = 0
        rows_embeds, rows_labels = [], []
        for row, ids in enumerate(input_ids):
            ids = torch.tensor(list(ids), dtype=torch.long, device=self.device)
            row_labels = torch.tensor(labels[row], dtype=torch.long, device=self.device) if labels is not None else None
            is_image = ids == IMAGE_PLACEHOLDER_ID
            text_embeds = embed_tokens(ids.masked_fill(is_image, 0))
            pieces, label_pieces, start = [], [], 0
            for position in is_image.nonzero().flatten().tolist():
                image = image_embeds[next_image].to(text_embeds.dtype)
                next_image += 1
                pieces += [text_embeds[start:position], image]
                if row_labels is not None:
                    label_pieces += [row_labels[start:position], row_labels.new_full((len(image),), IGNORE_INDEX)]
                start = position + 1
            pieces.append(text_embeds[start:])
            rows_embeds.append(torch.cat(pieces))
            if row_labels is not None:
                label_pieces.append(row_labels[start:])
                rows_labels.append(torch.cat(label_pieces))
        return _right_pad(rows_embeds, rows_labels if labels is not None else None)

    def forward(
        self,
        input_ids: Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]] | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ):
        """One pass over the whole batch; returns the language model's output (with `.loss` given labels)."""
        has_images = pixel_values is not None or image_features is not None
        image_embeds = self.encode_images(pixel_values, image_features=image_features) if has_images else None
        inputs = self.build_inputs(input_ids, image_embeds, labels)
        return self.language_model(
            inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, labels=inputs.labels
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Sequence[int],
        image_embeds: torch.Tensor | None,
        options: GenerationOptions | None = None,
        streamer: TextIteratorStreamer | None = None,
        stop: threading.Event | None = None,
        prefixes: PrefixCache | None = None,
        image_key: str = "",
    ) -> list[int]:
        """Answer one prompt with the KV cache; returns the new token ids (ending with EOS if it stopped).

        With `prefixes`, the prompt's longest prefix that an earlier generation already computed (a
        conversation's earlier turns, the system prompt) is not computed again; `image_key` names the
        image, whose patches count as positions of the prefix.
        """
        options = options or GenerationOptions()
        inputs = self.build_inputs([input_ids], image_embeds)
        criteria = StoppingCriteriaList([_EventStop(stop)] if stop is not None else [])
        # An unnamed image gets a key equal to no other, so its positions are never taken for another's.
        keys = position_keys(input_ids, image_key or object(), 0 if image_embeds is None else image_embeds.shape[1])
        past = prefixes.take(keys) if prefixes is not None else None
        output = self.language_model.generate(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            past_key_values=past if past is not None else DynamicCache(config=self.language_model.config),
            eos_token_id=self.eos_token_id,
            pad_token_id=self.eos_token_id,
            use_cache=True,
            return_dict_in_generate=True,
            streamer=streamer,
            stopping_criteria=criteria,
            **options.generate_kwargs(),
        )
        tokens = output.sequences[0].tolist()
        if prefixes is not None:
            prefixes.put(keys + tokens, output.past_key_values)
        return tokens

    def stream(
        self,
        tokenizer: PreTrainedTokenizerBase,
        input_ids: Sequence[int],
        image_embeds: torch.Tensor | None,
        options: GenerationOptions | None = None,
        prefixes: PrefixCache | None = None,
        image_key: str = "",
    ) -> Iterator[str]:
        """Yield the growing answer text as tokens arrive. Closing the iterator stops generation."""
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.generate(input_ids, image_embeds, options, streamer, stop, prefixes, image_key)
            except BaseException as error:
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=run, name="generate", daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                if piece:
                    text += piece
                    yield text
        finally:
            stop.set()
            thread.join()
        if errors:
            raise errors[0]

    @torch.no_grad()
    def greedy_without_cache(
        self, input_ids: Sequence[int], image_embeds: torch.Tensor | None, max_new_tokens: int
    ) -> list[int]:
        """The original project's decoding: a full forward over the whole sequence for every new token.

        Kept as the reference that tests and benchmarks hold the KV-cached `generate` against.
        """
        embeds = self.build_inputs([input_ids], image_embeds).inputs_embeds
        embed_tokens = self.language_model.get_input_embeddings()
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            logits = self.language_model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            tokens.append(token)
            if token == self.eos_token_id:
                break
            next_embed = embed_tokens(torch.tensor([[token]], device=self.device))
            embeds = torch.cat([embeds, next_embed], dim=1)
        return tokens


def position_keys(input_ids: Sequence[int], image_key: object, image_tokens: int) -> list:
    """One key per position of the spliced sequence: a token id, or (image key, patch index)."""
    keys: list = []
    for token in input_ids:
        keys += [(image_key, patch) for patch in range(image_tokens)] if token == IMAGE_PLACEHOLDER_ID else [token]
    return keys


class PrefixCache:
    """KV caches of the last few generations, reusable by a prompt that starts the same way.

    A follow-up question's prompt repeats the conversation so far, so the cache of the previous turn
    (prompt + answer) covers most of it; only the new part is computed. Holds `size` caches (each up
    to ~0.65 MB per position for phi-2 in fp32); one generation at a time uses it.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.entries: list[tuple[list, DynamicCache]] = []
        self.lock = threading.Lock()
        self.reused = 0  # positions not recomputed by the last `take`, for tests and benchmarks

    def take(self, keys: list) -> DynamicCache | None:
        """Remove and return the cache sharing the longest prefix with `keys`, cut to that prefix."""
        with self.lock:
            best, length = None, 0
            for index, (cached, _) in enumerate(self.entries):
                shared = _common_prefix(cached, keys)
                if shared > length:
                    best, length = index, shared
            self.reused = min(length, len(keys) - 1)  # at least one position must be fed to get logits
            if best is None or self.reused == 0:
                return None
            _, cache = self.entries.pop(best)
        surplus = cache.get_seq_length() - self.reused
        if surplus > 0:
            cache.crop(-surplus)  # transformers 5 crops by the number of positions to drop
        return cache

    def put(self, keys: list, cache: DynamicCache) -> None:
        """Keep `cache`, which covers the first `cache.get_seq_length()` of `keys` (the last token is not fed)."""
        with self.lock:
            self.entries.append((keys[: cache.get_seq_length()], cache))
            del self.entries[: -self.size]


def _common_prefix(a: list, b: list) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


class _EventStop(StoppingCriteria):
    """Stops generation once `event` is set (the reader went away, or the user pressed Stop)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _right_pad(embeds: list[torch.Tensor], labels: list[torch.Tensor] | None) -> MultimodalInputs:
    length = max(len(row) for row in embeds)
    pads = [length - len(row) for row in embeds]
    batch_embeds = torch.stack([F.pad(row, (0, 0, 0, pad)) for row, pad in zip(embeds, pads, strict=True)])
    attention_mask = torch.stack(
        [
            F.pad(torch.ones(len(row), dtype=torch.long, device=row.device), (0, pad))
            for row, pad in zip(embeds, pads, strict=True)
        ]
    )
    batch_labels = None
    if labels is not None:
        batch_labels = torch.stack(
            [F.pad(row, (0, pad), value=IGNORE_INDEX) for row, pad in zip(labels, pads, strict=True)]
        )
    return MultimodalInputs(batch_embeds, attention_mask, batch_labels)
