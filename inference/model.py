"""MultimodalPhi: vision tower + projector + causal language model, shared by training and serving.

There is one definition of how images and token ids become `inputs_embeds` and `labels`
(`build_inputs`: the image embeddings are scattered into the prompt's placeholder positions); the
training loss (`forward`) and generation (`generate`) both use it. The model computes; turning text
into ids and streamed tokens back into text is the assistant's job.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AttentionInterface,
    DynamicCache,
    PreTrainedModel,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from inference.config import GenerationOptions
from inference.decode_attention import decode_attention, fits, kernel
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
    def max_positions(self) -> int:
        return self.language_model.config.max_position_embeddings

    @property
    def embedding_dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    def encode_images(
        self, pixel_values: torch.Tensor | None = None, *, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pixels (B, 3, H, W), or cached patch features (B, patches, vision width) → (B, patches, text width)."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("give exactly one of pixel_values or image_features")
        projector = next(self.projector.parameters())  # the tower is where the projector is (the language
        if image_features is None:  # model may be elsewhere: on the meta device for the llama.cpp backend)
            image_features = self.vision_tower(pixel_values.to(projector.device))
        image_embeds = self.projector(image_features.to(projector.device, projector.dtype))
        return image_embeds.to(self.embedding_dtype)

    def build_inputs(
        self,
        input_ids: Sequence[Sequence[int]],
        image_embeds: torch.Tensor | None,
        labels: Sequence[Sequence[int]] | None = None,
    ) -> MultimodalInputs:
        """Right-pad the batch and scatter the image embeddings into its placeholder positions, in order.

        `image_embeds` (images, patches, width) fills the batch's `IMAGE_PLACEHOLDER_ID` positions row
        by row, one patch per position, so each image needs `patches` placeholders (the template puts
        them there); those positions are never supervised. Labels stay aligned with inputs; the
        language model shifts them by one when it computes the loss.
        """
        lengths = [len(ids) for ids in input_ids]
        if labels is not None and [len(row) for row in labels] != lengths:
            raise ValueError("labels and input_ids must have the same lengths")
        length = max(lengths)
        ids = torch.tensor([[*row, *[0] * (length - len(row))] for row in input_ids], device=self.device)
        attention_mask = torch.tensor([[1] * n + [0] * (length - n) for n in lengths], device=self.device)
        is_image = ids == IMAGE_PLACEHOLDER_ID
        embed_tokens = self.language_model.get_input_embeddings()
        patches = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        positions = int(is_image.sum())
        if positions != patches:
            images = 0 if image_embeds is None else image_embeds.shape[0]
            raise ValueError(
                f"the prompts hold {positions} image positions but {images} images of "
                f"{0 if image_embeds is None else image_embeds.shape[1]} patches were given: "
                "render each image as one placeholder per patch"
            )
        embeds = embed_tokens(ids.masked_fill(is_image, 0))
        if image_embeds is not None:
            if image_embeds.shape[-1] != embed_tokens.embedding_dim:
                raise ValueError(
                    f"image embeddings are {image_embeds.shape[-1]} wide; the language model expects "
                    f"{embed_tokens.embedding_dim}"
                )
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))
        embeds = embeds.masked_fill(attention_mask.unsqueeze(-1) == 0, 0.0)
        batch_labels = None
        if labels is not None:
            padded = [[*row, *[IGNORE_INDEX] * (length - len(row))] for row in labels]
            batch_labels = torch.tensor(padded, device=self.device).masked_fill(is_image, IGNORE_INDEX)
        return MultimodalInputs(embeds, attention_mask, batch_labels)

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
        streamer=None,
        stop: threading.Event | None = None,
        prefixes: PrefixCache | None = None,
        image_key: str = "",
    ) -> list[int]:
        """Answer one prompt with the KV cache; returns the new token ids (ending with EOS if it stopped).

        `streamer` (transformers' `put`/`end` protocol) receives the tokens as they come; setting `stop`
        ends generation early. With `prefixes`, the prompt's longest prefix that an earlier generation
        already computed (a conversation's earlier turns, the system prompt) is not computed again;
        `image_key` names the image, whose positions only match the same image's.
        """
        options = options or GenerationOptions()
        inputs = self.build_inputs([input_ids], image_embeds)
        criteria = StoppingCriteriaList([_EventStop(stop)] if stop is not None else [])
        # An unnamed image gets a key equal to no other, so its positions are never taken for another's.
        image_key = image_key or object()
        past = prefixes.take(input_ids, image_key) if prefixes is not None else None
        output = self.language_model.generate(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            cache=past if past is not None else DynamicCache(config=self.language_model.config),
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
            prefixes.put([*input_ids, *tokens], image_key, output.cache)
        return tokens

    @torch.no_grad()
    def prefill(
        self, input_ids: Sequence[int], image_embeds: torch.Tensor | None = None, past: DynamicCache | None = None
    ) -> tuple[DynamicCache, torch.Tensor]:
        """The KV cache of a prompt (the system prompt; up to the question, image included; or a whole prompt),
        continuing `past` when given (the KV of its first positions), and its last position's logits."""
        cache = past if past is not None else DynamicCache(config=self.language_model.config)
        output = self.language_model(
            inputs_embeds=self.prompt_embeds(input_ids, image_embeds, cache), cache=cache, logits_to_keep=1
        )
        return cache, output.logits[0, -1]

    def prompt_embeds(
        self, input_ids: Sequence[int], image_embeds: torch.Tensor | None, cache: DynamicCache
    ) -> torch.Tensor:
        """The embeddings (1, positions, width) of a prompt's positions after those `cache` holds."""
        return self.build_inputs([input_ids], image_embeds).inputs_embeds[:, cache.get_seq_length() :]

    @torch.no_grad()
    def generate_batch(
        self, input_ids: Sequence[Sequence[int]], image_embeds: torch.Tensor | None, max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy answers to a batch of prompts (evaluation); each ends before its EOS.

        The prompts are left-padded, as generation needs every row's last position at the same index;
        the position ids follow the attention mask, so each row computes what it would alone.
        """
        inputs = self.build_inputs(input_ids, image_embeds)
        embeds, mask = inputs.inputs_embeds, inputs.attention_mask
        for row, length in enumerate(len(ids) for ids in input_ids):  # right padding → left padding
            embeds[row] = embeds[row].roll(embeds.shape[1] - length, dims=0)
            mask[row] = mask[row].roll(mask.shape[1] - length)
        output = self.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.eos_token_id,
        )
        answers = []
        for tokens in output.tolist():
            answers.append(tokens[: tokens.index(self.eos_token_id)] if self.eos_token_id in tokens else tokens)
        return answers


class PrefixCache:
    """KV caches of the last few generations, reusable by a prompt that starts the same way.

    A follow-up question's prompt repeats the conversation so far, so the cache of the previous turn
    (prompt + answer) covers most of it; only the new part is computed. An entry is keyed by its ids
    and its image: image positions only match the same image's. Holds the newest `size` caches, as many as fit
    in `budget` bytes (2 × 32 layers × 2560 × 4 bytes ≈ 0.65 MB per position for phi-2 in fp32); the pinned
    one is not counted. Thread-safe.
    """

    def __init__(self, size: int = 2, budget: float = float("inf")) -> None:
        self.size, self.budget = size, budget
        self.entries: list[tuple[list[int], object, DynamicCache]] = []
        self.pinned: tuple[list[int], DynamicCache] | None = None  # a prefix every prompt starts with
        self.lock = threading.Lock()

    def pin(self, ids: Sequence[int], cache: DynamicCache) -> None:
        """Keep `cache` (all of `ids`, text only) for good: the system prompt's KV, computed once at start.
        `take` hands out copies of it, so a question about a new image leaves the other entries alone."""
        with self.lock:
            self.pinned = (list(ids), cache)

    def covered(self, input_ids: Sequence[int], image_key: object) -> int:
        """Leading positions of `input_ids` that an entry (not the pinned one) already holds."""
        with self.lock:
            return max((shared_prefix(ids, image, input_ids, image_key) for ids, image, _ in self.entries), default=0)

    def take(self, input_ids: Sequence[int], image_key: object) -> DynamicCache | None:
        """Remove and return the cache sharing the longest prefix with `input_ids`, cut to that prefix (a copy
        of the pinned one when no entry shares more)."""
        with self.lock:
            best, length = None, 0
            for index, (cached, cached_image, _) in enumerate(self.entries):
                shared = shared_prefix(cached, cached_image, input_ids, image_key)
                if shared > length:
                    best, length = index, shared
            pinned = 0 if self.pinned is None else shared_prefix(self.pinned[0], None, input_ids, image_key)
            if pinned >= length:
                best, length = None, pinned
            length = min(length, len(input_ids) - 1)  # at least one position must be fed to get logits
            if length <= 0:
                return None
            cache = copy.deepcopy(self.pinned[1]) if best is None else self.entries.pop(best)[2]
        surplus = cache.get_seq_length() - length
        if surplus > 0:
            cache.crop(-surplus)  # transformers 5 crops by the number of positions to drop
        return cache

    def put(self, ids: Sequence[int], image_key: object, cache: DynamicCache) -> None:
        """Keep `cache`, which covers the first `cache.get_seq_length()` of `ids` (the last token is not fed)."""
        with self.lock:
            self.entries.append((list(ids[: cache.get_seq_length()]), image_key, cache))
            del self.entries[: -self.size]
            held = [cache_bytes(entry[2]) for entry in self.entries]
            while held and sum(held) > self.budget:  # the oldest go first
                held.pop(0)
                self.entries.pop(0)


def cache_bytes(cache: DynamicCache) -> int:
    """Memory a KV cache holds (whole storages: a cropped cache still holds what it was cut from)."""
    tensors = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values) if tensor is not None]
    return sum({tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}.values())


def shared_prefix(a: Sequence[int], a_image: object, b: Sequence[int], b_image: object) -> int:
    """Leading positions two prompts share; with different images, only those before the first image position."""
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y or (x == IMAGE_PLACEHOLDER_ID and a_image != b_image):
            break
        length += 1
    return length


ROW_BY_ROW = "sdpa_row_by_row"  # the attention `MultimodalPhi` serves with (`row_by_row_attention`)


def row_by_row_attention(
    module, query, key, value, attention_mask, row_starts: Sequence[int] | None = None, step_cache=None, **kwargs
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except that a decode step (one new position per row) computes each row
    alone, over its own positions: the call its row would make with nothing else in the batch (all rows in one
    call of `inference.decode_attention`'s kernel where it is built, else sdpa row by row). Left padding
    shifts a row's positions in a batched kernel and its masked columns change the kernel's path, so a row's
    attention would differ in the last bits from its own, and a near tie could pick another token: with this,
    an int8 answer (whose products are exact per row) is the same, bit for bit, whoever else is asking.

    `row_starts` (a model's forward passes it on), each row's first column when the rows are left padded: the
    same for every layer, so its caller reads it once a step instead of every layer reading the mask.

    `step_cache`, a batch's KV cache (its rows' new positions written): the pass computes a prompt (`key`, `value`)
    and, after its positions, each of the batch's rows at its next position (`inference.backends.joint`)."""
    if step_cache is not None:
        prompt = query.shape[2] - len(row_starts)
        layer = step_cache.layers[module.layer_idx]
        rows, _ = row_by_row_attention(
            module, query[:, :, prompt:].transpose(0, 2), layer.keys, layer.values, None, row_starts, **kwargs
        )
        head, _ = sdpa_attention_forward(module, query[:, :, :prompt], key, value, attention_mask, **kwargs)
        return torch.cat([head, rows.transpose(0, 1)], dim=1), None
    if query.shape[2] != 1:  # a prompt: always computed alone (`inference.batching`)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    firsts, masks = [], []  # each row's first column (after its left padding), and its mask if it needs one
    for row in range(query.shape[0]):
        if row_starts is not None:
            first, mask = row_starts[row], None
        else:
            mask = None if attention_mask is None else attention_mask[min(row, len(attention_mask) - 1), :, -1:]
            first = 0 if mask is None else int(mask[0, 0].int().argmax())  # the padding before the row's positions
            if mask is not None and not mask[..., first:].all():  # not only left padding: the mask as given
                first, mask = 0, mask[None]
            else:
                mask = None
        firsts.append(first)
        masks.append(mask)
    # Every row over its own columns (a mask that is more than left padding is never served; it takes sdpa).
    if all(mask is None for mask in masks) and not module.training and kernel() is not None and fits(query, key, value):
        return decode_attention(query, key, value, firsts, kwargs.get("scaling") or query.shape[-1] ** -0.5), None
    rows = []
    for row, (first, mask) in enumerate(zip(firsts, masks, strict=True)):
        keys, values = key[row : row + 1, :, first:], value[row : row + 1, :, first:]
        rows.append(sdpa_attention_forward(module, query[row : row + 1], keys, values, mask, **kwargs)[0])
    return torch.cat(rows), None


AttentionInterface.register(ROW_BY_ROW, row_by_row_attention)
AttentionMaskInterface.register(ROW_BY_ROW, sdpa_mask)


def next_token(logits: torch.Tensor, generated: Sequence[int], options: GenerationOptions) -> int:
    """The next token as transformers' `generate` picks it from the last position's logits (vocabulary,), given
    the tokens generated so far (its processors, in its order), for the backends that decode step by step."""
    scores = logits.float()[None]
    ids = torch.tensor([list(generated)], dtype=torch.long)
    if options.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(options.repetition_penalty)(ids, scores)
    if not options.do_sample:
        return int(scores.argmax())
    scores = TopPLogitsWarper(options.top_p)(ids, TemperatureLogitsWarper(options.temperature)(ids, scores))
    return int(torch.multinomial(scores.softmax(-1), 1))


class _EventStop(StoppingCriteria):
    """Stops generation once `event` is set (the reader went away, or the user pressed Stop)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
