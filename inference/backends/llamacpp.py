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
import itertools
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from inference.backends import SLOTS, LoadedBackend
from inference.batching import Answer, Batcher, T
from inference.cli import UsageError
from inference.config import GenerationOptions, Manifest, ManifestError
from inference.gguf_files import export
from inference.hub import resolve_weights
from inference.loading import build_model
from inference.model import MultimodalPhi, shared_prefix
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
    """llama.cpp through llama-cpp-python's C API: a prompt of token ids and image embeddings, logits out.
    It holds `sequences` conversations' KV caches, each with a `context` of its own (and its memory)."""

    def __init__(self, path: Path, threads: int, context: int = 512, batch: int = 512, sequences: int = 1) -> None:
        import llama_cpp

        _quiet_logs()
        self.api = llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context * sequences
        params.n_seq_max = sequences
        params.kv_unified = False  # a KV buffer per sequence: a step's attention reads only each row's own
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

    def forget_from(self, position: int, sequence: int = 0) -> None:
        """Drop `sequence`'s KV cache from `position` on (the positions before it stay usable)."""
        self.api.llama_memory_seq_rm(self.api.llama_get_memory(self.context), sequence, position, -1)

    def copy(self, source: int, target: int) -> None:
        """`target`'s KV cache becomes a copy of `source`'s (the whole sequence: llama.cpp copies no part of
        one sequence's buffer into another's)."""
        memory = self.api.llama_get_memory(self.context)
        self.api.llama_memory_seq_rm(memory, target, -1, -1)
        self.api.llama_memory_seq_cp(memory, source, target, -1, -1)

    def step(self, tokens: list[int], positions: list[int], sequences: list[int]) -> np.ndarray:
        """One token for each of several sequences, at its position, in one batch: logits (tokens, vocabulary)."""
        batch = self.api.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for index, (token, position, sequence) in enumerate(zip(tokens, positions, sequences, strict=True)):
                batch.token[index], batch.pos[index], batch.logits[index] = token, position, True
                batch.n_seq_id[index], batch.seq_id[index][0] = 1, sequence
            if self.api.llama_decode(self.context, batch):
                raise RuntimeError("llama_decode failed")
            return np.stack([self.logits(index) for index in range(len(tokens))])
        finally:
            self.api.llama_batch_free(batch)

    def decode(
        self, ids: list[int], embeds: np.ndarray, start: int, outputs: str = "last", sequence: int = 0
    ) -> np.ndarray:
        """Feed `ids` (image placeholders taking the rows of `embeds` in order) at positions from `start` into
        `sequence`; returns the logits of the last position, or of every position (`outputs="all"`)."""
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
                batch.seq_id[index][0] = sequence
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


@dataclass(eq=False)
class Held:
    """What one llama.cpp sequence's KV cache holds: the ids of its positions and the image they show."""

    ids: list[int] = field(default_factory=list)
    image_key: object = None
    used: int = 0  # when it last served (a counter): of the free sequences, the least recently used is taken


class LlamaCppRows:
    """`inference.batching.Rows` for llama.cpp: each answer decodes in a sequence of its own (one per slot, each
    with its own context); a step feeds every running answer's newest token in one llama.cpp batch. A sequence
    keeps its last prompt and answer when the answer leaves: a question takes the free sequence that holds the
    longest prefix of it (a conversation's earlier turns, an image read on upload), else the least recently
    used, and computes only the rest."""

    def __init__(self, llm: LlamaCpp, slots: int) -> None:
        self.llm = llm
        self.held = [Held() for _ in range(slots)]
        self.sequence: dict[Answer, int] = {}  # the answers started or running, and their sequences
        self.clock = itertools.count(1)

    def fits(self, answers: list[Answer]) -> bool:
        return True  # every sequence has the whole context, its memory taken at start

    def idle(self) -> list[int]:
        """The sequences no answer is using."""
        busy = set(self.sequence.values())
        return [index for index in range(len(self.held)) if index not in busy]

    def take(self, input_ids: list[int], image_key: object) -> int:
        """The free sequence sharing the longest prefix with `input_ids` (of those, the least recently used)."""
        return max(self.idle(), key=lambda index: (self.shared(index, input_ids, image_key), -self.held[index].used))

    def shared(self, index: int, input_ids: list[int], image_key: object) -> int:
        held = self.held[index]
        return shared_prefix(held.ids, held.image_key, input_ids, image_key)

    def feed(self, index: int, input_ids: list[int], embeds: np.ndarray, image_key: object) -> np.ndarray:
        """Decode `input_ids` into sequence `index` after the longest prefix it already holds; the last logits."""
        held = self.held[index]
        shared = min(self.shared(index, input_ids, image_key), len(input_ids) - 1)
        self.llm.forget_from(shared, index)
        held.ids, held.image_key, held.used = input_ids[:shared], image_key, next(self.clock)
        rows = input_ids[:shared].count(IMAGE_PLACEHOLDER_ID)  # image rows the kept cache already holds
        logits = self.llm.decode(input_ids[shared:], embeds[rows:], start=shared, sequence=index)
        held.ids = list(input_ids)
        return logits

    def prepare(self, prefix_ids: list[int], embeds: np.ndarray, image_key: object) -> None:
        """A prefix computed ahead: into a free sequence (none while every slot answers: the question will compute
        it); the system prompt (no image) into every free one."""
        if not self.idle():
            return
        index = self.take(prefix_ids, image_key)
        if self.shared(index, prefix_ids, image_key) < len(prefix_ids):  # else a sequence already has it
            self.feed(index, prefix_ids, embeds, image_key)
        if image_key is None:
            for other in self.idle():
                if self.shared(other, prefix_ids, None) < len(prefix_ids):
                    self.llm.copy(index, other)
                    held = self.held[index]
                    self.held[other] = Held(list(held.ids), held.image_key, self.held[other].used)

    def start(self, answer: Answer, running: list[Answer]) -> tuple[torch.Tensor, None]:
        index = self.sequence[answer] = self.take(answer.input_ids, answer.image_key)
        embeds = embedding_rows(answer.image_embeds, self.llm)
        return torch.from_numpy(self.feed(index, answer.input_ids, embeds, answer.image_key)), None  # no step

    def enter(self, answer: Answer, running: list[Answer]) -> None:
        pass  # its sequence holds its prompt already

    def step(self, running: list[Answer]) -> torch.Tensor:
        sequences = [self.sequence[answer] for answer in running]
        tokens = [answer.tokens[-1] for answer in running]
        logits = self.llm.step(tokens, [answer.positions for answer in running], sequences)
        for index, token in zip(sequences, tokens, strict=True):
            self.held[index].ids.append(token)
        return torch.from_numpy(logits)

    def leave(self, complete: list[Answer], running: list[Answer]) -> None:
        for answer in complete:
            self.held[self.sequence.pop(answer)].used = next(self.clock)

    def set_aside(self, answer: Answer, keep: bool) -> None:
        index = self.sequence.pop(answer, None)
        if index is not None and not keep:
            self.forget(index)

    def reset(self) -> None:
        for index in self.sequence.values():
            self.forget(index)
        self.sequence.clear()

    def forget(self, index: int) -> None:
        self.llm.forget_from(0, index)
        self.held[index] = Held()


def embedding_rows(image_embeds: torch.Tensor | None, llm: LlamaCpp) -> np.ndarray:
    """An image's embeddings (1, positions, width) as llama.cpp takes them: float32 rows (none without an image)."""
    return (
        image_embeds[0].detach().float().numpy() if image_embeds is not None else np.zeros((0, llm.width), np.float32)
    )


class LlamaCppBackend:
    """The app's llama.cpp backend (`inference.backends.ServingBackend`): images go through
    the weights' own vision tower and projector in PyTorch (fp32: exact for every projector type, and
    untouched by llama.cpp's class-token bug, see `inference.gguf_files`), their embeddings and the text
    through the language model in llama.cpp. Up to `slots` answers are decoded together (`Batcher` with
    `LlamaCppRows`), tokens chosen as `MultimodalPhi.generate` does: the same stop rule (end of text, the stop
    event, `max_new_tokens`) and transformers' own logits processors for the repetition penalty, temperature
    and top-p. A follow-up question finds its conversation's KV cache in the sequence that answered it."""

    def __init__(
        self,
        vision: MultimodalPhi,
        language_model: Path,
        threads: int,
        slots: int = SLOTS,
        batcher: Batcher | None = None,
    ) -> None:
        self.vision = vision.eval()  # the vision tower and projector; its language model is a shapes-only skeleton
        self.image_size = vision.vision_tower.image_size
        self.max_positions = vision.language_model.config.max_position_embeddings
        self.file = language_model
        self.llm = LlamaCpp(language_model, threads, context=self.max_positions, sequences=slots)
        self.rows = LlamaCppRows(self.llm, slots)
        self.batcher = batcher or Batcher(slots=slots)  # the one that loaded `vision`, when given (`load_llamacpp`)
        self.batcher.rows, self.batcher.slots, self.batcher.eos_token_id = self.rows, slots, vision.eos_token_id
        self.slots = slots

    def describe(self) -> str:
        return f"llama.cpp {self.file.stem.removeprefix('language-model-').upper()}"

    def prepare(self, prefix_ids: Sequence[int], image_embeds: torch.Tensor | None = None, image_key: str = "") -> None:
        rows = embedding_rows(image_embeds, self.llm)
        key = (image_key or object()) if image_embeds is not None else None  # an unnamed image matches no other
        self.batcher.call(lambda: self.rows.prepare(list(prefix_ids), rows, key))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.batcher.call(torch.no_grad()(lambda: self.vision.encode_images(pixel_values).float()))

    def call(self, run: Callable[[], T]) -> T:
        return self.batcher.call(run)

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
        return self.batcher.generate(input_ids, image_embeds, options, streamer, stop, image_key)


GGUF_CACHE = SERVING_CACHE / "gguf"  # exports made at startup, one folder per weights
SERVED_KIND = "q8_0"  # the GGUF type that stays faithful in benchmarks/RESULTS.md (Q4_K_M does not)


def load_llamacpp(
    weights: str | Path, gguf: str | Path | None, threads: int, cache: Path = GGUF_CACHE, slots: int = SLOTS
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
    batcher = Batcher(slots=slots)  # its thread exports, loads the vision tower and computes everything after
    path = _gguf_file(resolve_weights(gguf)) if gguf else batcher.call(lambda: _exported(folder, manifest, cache))

    def skeleton(reference: str) -> PreTrainedModel:  # shapes only: llama.cpp holds the weights
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(reference))

    vision, tokenizer = batcher.call(lambda: build_model(manifest, folder, skeleton))
    return LoadedBackend(LlamaCppBackend(vision, path, threads, slots, batcher), tokenizer, manifest)


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
