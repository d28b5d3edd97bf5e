"""llama.cpp through llama-cpp-python's C API: prompts of token ids and image embeddings, logits out.

The image's positions go in as an embedding batch (the projector's output), the text as tokens, in
one sequence; that is what llama.cpp's own multimodal runtime does with an mmproj file. Used to check
exported GGUF files against PyTorch and by the CPU benchmark.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from inference.prompt import IMAGE_PLACEHOLDER_ID


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: a prompt of token ids and image embeddings, greedy decoding."""

    def __init__(self, path: Path, threads: int, context: int = 512) -> None:
        import llama_cpp

        self.api = llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = context
        params.n_threads = params.n_threads_batch = threads
        self.context = llama_cpp.llama_init_from_model(self.model, params)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.width = llama_cpp.llama_model_n_embd(self.model)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of `text` (no special tokens added or parsed)."""
        data = text.encode()
        buffer = (self.api.llama_token * (len(data) + 8))()
        vocab = self.api.llama_model_get_vocab(self.model)
        count = self.api.llama_tokenize(vocab, data, len(data), buffer, len(buffer), False, False)
        return list(buffer[:count])

    def clear(self) -> None:
        self.api.llama_memory_clear(self.api.llama_get_memory(self.context), True)

    def decode(self, ids: list[int], embeds: np.ndarray, start: int, outputs: str = "last") -> np.ndarray:
        """Feed `ids` (image placeholders taking the rows of `embeds` in order) at positions from `start`;
        returns the logits of the last position, or of every position (`outputs="all"`)."""
        runs, row = [], 0  # consecutive token runs and image runs, each one batch
        for position, token in enumerate(ids):
            image = token == IMAGE_PLACEHOLDER_ID
            if not runs or runs[-1][0] != image:
                runs.append((image, []))
            runs[-1][1].append((position, token))
        logits = []
        for image, items in runs:
            batch = self.api.llama_batch_init(len(items), self.width if image else 0, 1)
            batch.n_tokens = len(items)
            for index, (position, token) in enumerate(items):
                if image:
                    values = np.ascontiguousarray(embeds[row], dtype=np.float32)
                    ctypes.memmove(
                        ctypes.byref(batch.embd.contents, index * self.width * 4), values.ctypes.data, values.nbytes
                    )
                    row += 1
                else:
                    batch.token[index] = token
                batch.pos[index] = start + position
                batch.n_seq_id[index] = 1
                batch.seq_id[index][0] = 0
                batch.logits[index] = outputs == "all" or position == len(ids) - 1
            if self.api.llama_decode(self.context, batch):
                raise RuntimeError("llama_decode failed")
            if outputs == "all":
                logits += [self.logits(index) for index in range(len(items))]
            self.api.llama_batch_free(batch)
        return np.stack(logits) if outputs == "all" else self.logits(-1)

    def logits(self, index: int) -> np.ndarray:
        pointer = self.api.llama_get_logits_ith(self.context, index)
        return np.ctypeslib.as_array(pointer, shape=(self.vocab,)).copy()
