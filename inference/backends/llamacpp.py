"""The llama.cpp backend: the language model in llama.cpp (llama-cpp-python's C API), images in PyTorch.

The image's positions go in as an embedding batch (the projector's output), the text as tokens, in
one sequence; that is what llama.cpp's own multimodal runtime does with an mmproj file. `LlamaCpp` is
the language model (logits for a prompt), `LlamaCppBackend` the serving backend, and `load_llamacpp`
builds it for a weights folder, exporting the GGUF file once into the serving cache when none is given.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from inference.backends import LoadedBackend
from inference.cli import UsageError
from inference.config import GenerationOptions, Manifest, ManifestError
from inference.gguf_files import export
from inference.hub import resolve_weights
from inference.loading import build_model
from inference.model import MultimodalPhi, next_token, shared_prefix
from inference.prompt import IMAGE_PLACEHOLDER_ID
from inference.serving_cache import SERVING_CACHE, gguf_location


@functools.cache
def _quiet_logs() -> object:
    """Route llama.cpp's and mtmd's load chatter (hundreds of lines) to nowhere; errors surface as return codes."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    callback = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p())
    mtmd_cpp.mtmd_log_set(callback, ctypes.c_void_p())
    return callback  # kept alive by the cache: llama.cpp calls it for the life of the process


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: a prompt of token ids and image embeddings, logits out."""

    def __init__(self, path: Path, threads: int, context: int = 512, batch: int = 512) -> None:
        import llama_cpp

        _quiet_logs()
        self.api = llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context
        params.n_batch = params.n_ubatch = self.batch = min(batch, context)
        params.n_threads = params.n_threads_batch = threads
        self.context = llama_cpp.llama_init_from_model(self.model, params)
        if not self.context:
            raise RuntimeError(f"llama.cpp could not make a {context}-position context for {path}")
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.width = llama_cpp.llama_model_n_embd(self.model)

    def __del__(self) -> None:
        if getattr(self, "context", None):
            self.api.llama_free(self.context)
        if getattr(self, "model", None):
            self.api.llama_model_free(self.model)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of `text` (no special tokens added or parsed)."""
        data = text.encode()
        buffer = (self.api.llama_token * (len(data) + 8))()
        vocab = self.api.llama_model_get_vocab(self.model)
        count = self.api.llama_tokenize(vocab, data, len(data), buffer, len(buffer), False, False)
        return list(buffer[:count])

    def clear(self) -> None:
        self.api.llama_memory_clear(self.api.llama_get_memory(self.context), True)

    def forget_from(self, position: int) -> None:
        """Drop the KV cache's positions from `position` on (the ones before it stay usable)."""
        self.api.llama_memory_seq_rm(self.api.llama_get_memory(self.context), 0, position, -1)

    def decode(self, ids: list[int], embeds: np.ndarray, start: int, outputs: str = "last") -> np.ndarray:
        """Feed `ids` (image placeholders taking the rows of `embeds` in order) at positions from `start`;
        returns the logits of the last position, or of every position (`outputs="all"`)."""
        runs, row = [], 0  # consecutive token runs and image runs, each at most one batch
        for position, token in enumerate(ids):
            image = token == IMAGE_PLACEHOLDER_ID
            if not runs or runs[-1][0] != image or len(runs[-1][1]) == self.batch:
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


class LlamaCppBackend:
    """The app's llama.cpp backend (`inference.backends.ServingBackend`): images go through
    the weights' own vision tower and projector in PyTorch (fp32: exact for every projector type, and
    untouched by llama.cpp's class-token bug, see `inference.gguf_files`), their embeddings and the text
    through the language model in llama.cpp. Decoding follows `MultimodalPhi.generate`: the same stop
    rule (end of text, the stop event, `max_new_tokens`) and transformers' own logits processors for the
    repetition penalty, temperature and top-p. The KV cache of the last answer is reused for the longest
    prefix the next prompt shares with it (a conversation's earlier turns), as `PrefixCache` does."""

    def __init__(self, vision: MultimodalPhi, language_model: Path, threads: int) -> None:
        self.vision = vision.eval()  # the vision tower and projector; its language model is a shapes-only skeleton
        self.image_size = vision.vision_tower.image_size
        self.eos_token_id = vision.eos_token_id
        self.max_positions = vision.language_model.config.max_position_embeddings
        self.file = language_model
        self.llm = LlamaCpp(language_model, threads, context=self.max_positions)
        self.cached: list[int] = []  # the positions the KV cache holds
        self.cached_image: object = None
        self.lock = threading.Lock()  # one llama.cpp context: one answer at a time
        self.slots = 1

    def describe(self) -> str:
        return f"llama.cpp {self.file.stem.removeprefix('language-model-').upper()}"

    def prepare(self, prefix_ids: Sequence[int], image_embeds: torch.Tensor | None = None, image_key: str = "") -> None:
        """The prefix decoded into the one context, where the next question finds it."""
        with self.lock:
            self._feed(list(prefix_ids), self._rows(image_embeds), image_key or None)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision.encode_images(pixel_values).float()

    def generate(
        self,
        input_ids: Sequence[int],
        image_embeds: torch.Tensor | None,
        options: GenerationOptions | None = None,
        streamer=None,
        stop: threading.Event | None = None,
        image_key: str = "",
    ) -> list[int]:
        """Answer one prompt; returns the new token ids (ending with the end-of-text id if it stopped there)."""
        options = options or GenerationOptions()
        input_ids = list(input_ids)
        embeds = self._rows(image_embeds)
        with self.lock:
            logits = self._feed(input_ids, embeds, image_key or object())  # an unnamed image matches no other
            if streamer is not None:
                streamer.put(torch.tensor([input_ids]))  # the prompt, which the streamer skips
            tokens: list[int] = []
            while len(tokens) < options.max_new_tokens and not (stop is not None and stop.is_set()):
                token = next_token(torch.from_numpy(logits), tokens, options)
                tokens.append(token)
                if streamer is not None:
                    streamer.put(torch.tensor([token]))
                if token == self.eos_token_id or len(tokens) == options.max_new_tokens:
                    break
                logits = self.llm.decode([token], embeds[:0], start=len(self.cached))
                self.cached.append(token)
            if streamer is not None:
                streamer.end()
        return tokens

    def _rows(self, image_embeds: torch.Tensor | None) -> np.ndarray:
        return image_embeds[0].float().numpy() if image_embeds is not None else np.zeros((0, self.llm.width))

    def _feed(self, input_ids: list[int], embeds: np.ndarray, image_key: object) -> np.ndarray:
        """Decode `input_ids` into the context after the longest prefix it already holds; the last logits."""
        shared = min(shared_prefix(self.cached, self.cached_image, input_ids, image_key), len(input_ids) - 1)
        self.llm.forget_from(shared)
        self.cached, self.cached_image = input_ids[:shared], image_key
        rows = input_ids[:shared].count(IMAGE_PLACEHOLDER_ID)  # image rows the kept cache already holds
        logits = self.llm.decode(input_ids[shared:], embeds[rows:], start=shared)
        self.cached = list(input_ids)
        return logits


GGUF_CACHE = SERVING_CACHE / "gguf"  # exports made at startup, one folder per weights
SERVED_KIND = "q8_0"  # the GGUF type that stays faithful in benchmarks/RESULTS.md (Q4_K_M does not)


def load_llamacpp(
    weights: str | Path, gguf: str | Path | None, threads: int, cache: Path = GGUF_CACHE
) -> LoadedBackend:
    """The llama.cpp backend for a weights folder: its vision tower and projector from the folder, the
    language model from `gguf` (a folder or Hub repo holding `language-model-*.gguf`), or, without one,
    exported once from the weights into `cache` (q8_0; the first start takes the export's time)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise UsageError(
            "the llama.cpp backend needs llama-cpp-python (pip install -c constraints.txt -r requirements.txt); "
            "or serve with --backend torch"
        )
    folder = resolve_weights(weights)
    manifest = Manifest.load(folder)
    path = _gguf_file(resolve_weights(gguf)) if gguf else _exported(folder, manifest, cache)

    def skeleton(reference: str) -> PreTrainedModel:  # shapes only: llama.cpp holds the weights
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(reference))

    vision, tokenizer = build_model(manifest, folder, skeleton)
    return LoadedBackend(LlamaCppBackend(vision, path, threads), tokenizer, manifest)


def _gguf_file(folder: Path) -> Path:
    files = sorted(folder.glob("language-model-*.gguf"))
    if not files:
        raise ManifestError(f"{folder} holds no language-model-*.gguf (python -m training.export_gguf writes one)")
    preferred = folder / f"language-model-{SERVED_KIND}.gguf"
    return preferred if preferred in files else files[0]


def _exported(folder: Path, manifest: Manifest, cache: Path) -> Path:
    """This weights folder's export in the cache (`gguf_location`), made now when missing."""
    target = gguf_location(folder, manifest, cache)
    if not (target / f"language-model-{SERVED_KIND}.gguf").is_file():
        print(f"exporting the language model to llama.cpp's format once, into {target}", flush=True)
        staging = target.with_name(f".{target.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        export(folder, staging, SERVED_KIND)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return _gguf_file(target)
