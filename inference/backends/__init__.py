"""Serving backends: what `Assistant` talks to, and the one way to load one.

A backend encodes images and generates answers; the assistant turns questions into prompts and tokens
into text, and never asks which backend it has. Each backend keeps what makes follow-up questions fast
(a KV cache of earlier answers) and what it makes once from a weights folder (`inference.serving_cache`).

- `Backend.TORCH` (`inference/backends/pytorch.py`): `MultimodalPhi` in PyTorch, in a `Precision` (int8 on
  the CPU by default, quantized at the first start and saved)
- `Backend.LLAMA_CPP` (`inference/backends/llamacpp.py`): the language model in llama.cpp (a Q8_0 GGUF
  file, exported at the first start when none is given), images through the weights' vision tower in PyTorch
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from inference.batching import T
from inference.config import GenerationOptions, Manifest
from inference.precision import DEFAULT_PRECISION, Precision
from inference.serving_cache import SERVING_CACHE

SLOTS = 8  # answers a backend decodes together; more wait in the app's queue


class Backend(StrEnum):
    TORCH = "torch"
    LLAMA_CPP = "llama.cpp"


class ServingBackend(Protocol):
    image_size: int  # pixels per side the vision tower takes
    max_positions: int  # the language model's context, image positions included
    slots: int  # answers it computes at once (decoded together); the app lets this many visitors in at a time

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, size, size) pixels → (images, image positions, width) embeddings for `generate`."""

    def call(self, run: Callable[[], T]) -> T:
        """`run()` on the thread that computes every answer, between two decode steps, and its result: the
        process's other torch work (speech) goes there, so that one thread computes (`inference.batching`)."""

    def generate(
        self,
        input_ids: Sequence[int],
        image_embeds: torch.Tensor | None,
        options: GenerationOptions | None = None,
        streamer=None,
        stop: threading.Event | None = None,
        image_key: str = "",
    ) -> list[int]:
        """The new token ids for a prompt (ending with the end-of-text id if it stopped there), each also put
        to `streamer`; stops early when `stop` is set. `image_key` names the image's pixels, so a cached
        earlier answer about the same image can be reused."""

    def prepare(self, prefix_ids: Sequence[int], image_embeds: torch.Tensor | None = None, image_key: str = "") -> None:
        """Compute ahead the KV cache of a prompt's beginning. Without an image, at start: the text every prompt
        begins with (the system prompt), kept for good; no question computes it again, and the kernels'
        first-call costs are paid before a visitor. With an image (its embeddings and key), when it is
        uploaded: the prompt up to the question, which a question about that image then finds cached."""

    def describe(self) -> str:
        """One line for people: what computes the answer, e.g. "PyTorch int8"."""


@dataclass
class LoadedBackend:
    backend: ServingBackend
    tokenizer: PreTrainedTokenizerBase
    manifest: Manifest


def load_backend(
    weights: str | Path,
    backend: Backend | str = Backend.TORCH,
    precision: Precision | str = DEFAULT_PRECISION,
    gguf: str | Path | None = None,
    threads: int | None = None,
    cache: Path = SERVING_CACHE,
    slots: int | None = None,
) -> LoadedBackend:
    """A weights folder (or Hub id) served by `backend`: in PyTorch in `precision` (int8 saved under
    `cache`/int8 at the first start), or in llama.cpp from the GGUF file in `gguf` (a folder or Hub repo),
    else exported once into `cache`/gguf. `threads`: llama.cpp's threads (default: torch's pool). `slots`: answers
    decoded together (default `SLOTS`)."""
    backend = Backend(backend)
    if backend is Backend.LLAMA_CPP:
        from inference.backends.llamacpp import load_llamacpp

        return load_llamacpp(weights, gguf, threads or torch.get_num_threads(), cache / "gguf", slots or SLOTS)
    from inference.backends.pytorch import load_torch

    return load_torch(weights, Precision(precision), cache / "int8", slots)
