"""The PyTorch backend: `MultimodalPhi` (the LoRA merged), concurrent answers decoded together (`Batcher`),
with a cache of recent answers' KV caches."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from inference.backends import SLOTS, LoadedBackend
from inference.batching import Batcher, TorchRows
from inference.config import GenerationOptions, Manifest
from inference.hub import resolve_weights
from inference.loading import load_weights
from inference.model import ROW_BY_ROW, MultimodalPhi, PrefixCache
from inference.precision import Precision
from inference.serving_cache import int8_location

PREFIX_CACHES = SLOTS  # KV caches of recent answers kept for follow-up questions, one per conversation answered at once
# The KV caches' memory, beside the served model and Whisper, within CPU Basic's 16 GB: the batch being decoded
# (a question waits while it would grow past this) and the caches kept for follow-ups (the oldest go first).
RUNNING_KV_BYTES = 5 << 30
KEPT_KV_BYTES = 3 << 30


class TorchBackend:
    """`inference.backends.ServingBackend` over a `MultimodalPhi`: up to `slots` answers decoded together, every
    computation of the language model on the batcher's thread (an image's encoding, small beside it, on its
    visitor's); follow-up turns reuse the KV cache of earlier ones (`PrefixCache`)."""

    def __init__(
        self,
        model: MultimodalPhi,
        precision: Precision | None = None,
        slots: int = SLOTS,
        kv_bytes: tuple[float, float] = (RUNNING_KV_BYTES, KEPT_KV_BYTES),
    ) -> None:
        self.model = model.eval()
        model.language_model.set_attn_implementation(ROW_BY_ROW)  # an answer is the same whoever else asks
        self.precision = precision  # how it was loaded, when known
        self.prefixes = PrefixCache(PREFIX_CACHES, budget=kv_bytes[1])
        self.batcher = Batcher(TorchRows(self.model, self.prefixes, kv_bytes[0]), slots, model.eos_token_id)
        self.slots = slots
        self.image_size = model.vision_tower.image_size
        self.max_positions = model.max_positions

    def describe(self) -> str:
        if self.precision is not None:
            return f"PyTorch {self.precision.value}"
        return f"PyTorch {str(self.model.language_model.dtype).removeprefix('torch.')}"

    def prepare(self, prefix_ids: Sequence[int], image_embeds: torch.Tensor | None = None, image_key: str = "") -> None:
        self.batcher.call(lambda: self._prepare(prefix_ids, image_embeds, image_key))

    def _prepare(self, prefix_ids: Sequence[int], image_embeds: torch.Tensor | None, image_key: str) -> None:
        if image_embeds is None:
            self.prefixes.pin(prefix_ids, self.model.prefill(prefix_ids)[0])
        elif self.prefixes.covered(prefix_ids, image_key) < len(prefix_ids):  # else a conversation already has it
            past = self.prefixes.take(prefix_ids, image_key)  # the system prompt's (a copy)
            self.prefixes.put(prefix_ids, image_key, self.model.prefill(prefix_ids, image_embeds, past)[0])

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)

    def generate(
        self,
        input_ids: Sequence[int],
        image_embeds: torch.Tensor | None,
        options: GenerationOptions | None = None,
        streamer=None,
        stop: threading.Event | None = None,
        image_key: str = "",
    ) -> list[int]:
        return self.batcher.generate(input_ids, image_embeds, options, streamer, stop, image_key)


def load_torch(
    weights: str | Path, precision: Precision, int8_cache: Path | None, slots: int | None = None
) -> LoadedBackend:
    """A weights folder in PyTorch in `precision`; int8 is quantized once and kept (`int8_location`)."""
    folder = resolve_weights(weights)
    int8_path = int8_location(folder, Manifest.load(folder), int8_cache) if precision is Precision.INT8 else None
    loaded = load_weights(folder, precision=precision, int8_path=int8_path)
    backend = TorchBackend(loaded.model, precision, slots or SLOTS)
    return LoadedBackend(backend, loaded.tokenizer, loaded.manifest)
