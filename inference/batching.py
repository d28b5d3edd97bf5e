"""Continuous batching: the answers being written at the same time are decoded together, one step for all.

A decode step reads every weight once, whether it computes one conversation's next token or eight
(`benchmarks/load.py` measures what that buys), so `Batcher` runs every computation of a backend on
one thread: a new question's prompt is computed alone (reusing a cached prefix) and joins the batch at
the next token boundary; an answer leaves as soon as it ends (end of text, its length limit, or its
visitor stopped), its KV cache kept for a follow-up question. A question joins only while a slot is
free and the batch's KV, every row at its length limit, fits (a question alone always starts);
otherwise it waits for rows to leave. Tokens are chosen here, as transformers' generate does.

What the batch's KV caches are and how a step computes is the model's side, `Rows`: `TorchRows` for
PyTorch (below), `inference.backends.llamacpp.LlamaCppRows` for llama.cpp. Each row computes what it
would alone (tests/test_batching.py holds greedy answers equal).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from inference.config import GenerationOptions
from inference.model import MultimodalPhi, PrefixCache, next_token

ROOM = 64  # positions a KV buffer grows by beyond what it needs, so most steps write in place


class GrowingLayer(DynamicLayer):
    """One layer's KV in a buffer with room to grow: a step writes its position in place, where transformers'
    `DynamicLayer` concatenates (copying the whole cache of every row, every token)."""

    def __init__(self) -> None:
        super().__init__()
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.length = 0

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold `keys`/`values` (batch, heads, positions, width) with room after them."""
        shape = (*keys.shape[:2], keys.shape[2] + ROOM, keys.shape[3])
        self.buffers = (keys.new_zeros(shape), values.new_zeros(shape))
        self.buffers[0][:, :, : keys.shape[2]] = keys
        self.buffers[1][:, :, : keys.shape[2]] = values
        self._view(keys.shape[2])

    def _view(self, length: int) -> None:
        self.length = length
        self.keys, self.values = (buffer[:, :, :length] for buffer in self.buffers)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[2]
        if self.buffers is None or end > self.buffers[0].shape[2]:
            self.set(
                *(torch.cat([old, new], dim=2) for old, new in ((self.keys, key_states), (self.values, value_states)))
            )
        else:
            self.buffers[0][:, :, self.length : end] = key_states
            self.buffers[1][:, :, self.length : end] = value_states
            self._view(end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


@dataclass(eq=False)
class Answer:
    """One question being answered: its prompt, how to choose tokens, where they go, and its place in the batch."""

    input_ids: list[int]
    image_embeds: torch.Tensor | None
    image_key: object
    options: GenerationOptions
    streamer: object | None
    stop: threading.Event | None
    tokens: list[int] = field(default_factory=list)
    positions: int = 0  # positions in its KV cache (the prompt, then every token fed back)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def choose(self, logits: torch.Tensor, eos: int) -> bool:
        """Pick the next token from the last position's `logits` (vocabulary,) as transformers' generate does for
        these options; hand it on. Returns whether the answer is complete."""
        token = next_token(logits, self.tokens, self.options)
        self.tokens.append(token)
        if self.streamer is not None:
            self.streamer.put(torch.tensor([token]))
        return token == eos or len(self.tokens) >= self.options.max_new_tokens

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()


@dataclass(eq=False)
class Job:
    """Other work on the model (computing a prefix ahead), run between two decode steps."""

    run: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Rows(Protocol):
    """A model's side of continuous batching: the KV caches of the answers `Batcher` decodes together. Every
    method is called on the batcher's thread. `TorchRows` (below) and the llama.cpp backend's are the two."""

    def fits(self, answers: list[Answer]) -> bool:
        """Whether these answers' KV, each at its length limit, fits in memory together."""

    def start(self, answer: Answer) -> torch.Tensor:
        """Compute `answer`'s prompt, past whatever prefix of it is cached; the last position's logits."""

    def enter(self, answer: Answer, running: list[Answer]) -> None:
        """`answer` (started) joins the `running` ones' batch."""

    def step(self, running: list[Answer]) -> torch.Tensor:
        """Feed each running answer its newest token at its next position: logits (rows, vocabulary)."""

    def leave(self, complete: list[Answer], running: list[Answer]) -> None:
        """`complete` (some of `running`) leave the batch; each one's KV is kept for a follow-up question:
        prompt and answer, the last token not fed."""

    def set_aside(self, answer: Answer, keep: bool) -> None:
        """`answer`, started, never enters: complete at once (its KV kept, `keep`) or failed as it started."""

    def reset(self) -> None:
        """Forget the batch after an error."""


class Batcher:
    """Decodes up to `slots` answers together on one thread; `generate` is called from any number of threads."""

    def __init__(self, rows: Rows, slots: int = 8, eos_token_id: int | None = None):
        self.rows, self.slots, self.eos_token_id = rows, slots, eos_token_id
        self.waiting: deque[Answer | Job] = deque()
        self.running: list[Answer] = []
        self.condition = threading.Condition()
        self.thread: threading.Thread | None = None

    def generate(
        self,
        input_ids: Sequence[int],
        image_embeds: torch.Tensor | None,
        options: GenerationOptions | None = None,
        streamer=None,
        stop: threading.Event | None = None,
        image_key: str = "",
    ) -> list[int]:
        """`MultimodalPhi.generate`'s answer (the new ids, EOS included if it stopped there), decoded in a batch
        with whatever else is being answered."""
        # An unnamed image gets a key equal to no other, so its positions are never taken for another's.
        answer = Answer(
            list(input_ids), image_embeds, image_key or object(), options or GenerationOptions(), streamer, stop
        )
        self._wait(answer)
        return answer.tokens

    def call(self, run: Callable[[], None]) -> None:
        """Run `run` on the batching thread between two steps (so no two computations compete for the cores)."""
        self._wait(Job(run))

    def _wait(self, item: Answer | Job) -> None:
        with self.condition:
            self.waiting.append(item)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
                self.thread.start()
            self.condition.notify()
        item.done.wait()
        if item.error is not None:
            raise item.error

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.waiting and not self.running:
                    self.condition.wait()
                # Work ahead (a `Job`) never waits for a slot; a question waits until an answer leaves.
                ready = self.waiting and (isinstance(self.waiting[0], Job) or self._fits(self.waiting[0]))
                item = self.waiting.popleft() if ready else None
            if isinstance(item, Job):
                try:
                    item.run()
                except BaseException as error:
                    item.error = error
                item.done.set()
                continue
            try:
                if item is not None:
                    self._join(item)
                if self.running:
                    self._step()
            except BaseException as error:  # out of memory, say: every running answer's caller hears of it
                self._fail(error)

    def _fits(self, answer: Answer) -> bool:
        """Whether `answer` may join: a slot is free and the batch's KV fits with it. A question alone always starts."""
        rows = [*self.running, answer]
        return len(rows) == 1 or (len(rows) <= self.slots and self.rows.fits(rows))

    def _fail(self, error: BaseException) -> None:
        for answer in self.running:
            self._finish(answer, error)
        self.running = []
        self.rows.reset()

    def _join(self, answer: Answer) -> None:
        """Compute `answer`'s prompt (past its cached prefix) and first token; it joins the batch unless complete."""
        if answer.stopped():  # its visitor left while it waited
            return self._finish(answer)
        try:
            if answer.streamer is not None:
                answer.streamer.put(torch.empty(1, 0, dtype=torch.long))  # as generate(): the prompt first (none)
            logits = self.rows.start(answer)
            answer.positions = len(answer.input_ids)
            if answer.choose(logits, self.eos_token_id) or answer.stopped():
                self.rows.set_aside(answer, keep=True)
                return self._finish(answer)
        except BaseException as error:
            self.rows.set_aside(answer, keep=False)
            return self._finish(answer, error)
        running, self.running = self.running, [*self.running, answer]  # so that an error in `enter` reaches it
        self.rows.enter(answer, running)

    def _step(self) -> None:
        """Feed every running answer its newest token; each chooses its next; complete ones leave."""
        running = self.running
        logits = self.rows.step(running)
        complete = []
        for row, answer in enumerate(running):
            answer.positions += 1
            if answer.choose(logits[row], self.eos_token_id) or answer.stopped():
                complete.append(answer)
        if complete:
            self.rows.leave(complete, running)
            self.running = [answer for answer in running if answer not in complete]
            for answer in complete:
                self._finish(answer)

    @staticmethod
    def _finish(answer: Answer, error: BaseException | None = None) -> None:
        """Hand `answer` back to its caller."""
        answer.error = error
        if answer.streamer is not None:
            answer.streamer.end()
        answer.done.set()


class TorchRows:
    """`Rows` for a `MultimodalPhi`: one KV cache for the batch, its rows left padded so that every row's newest
    position is the same column, each row's positions and mask its own (so a row computes what it would alone).
    A prompt is computed alone from the longest cached prefix (`PrefixCache`); an answer's KV goes back there.
    The batch's KV is rows × its longest row: `fits` holds it, every row at its length limit, within `kv_bytes`."""

    def __init__(self, model: MultimodalPhi, prefixes: PrefixCache, kv_bytes: float = float("inf")):
        self.model, self.prefixes, self.kv_bytes = model, prefixes, kv_bytes
        self.position_bytes = kv_position_bytes(model.language_model)
        self.cache: Cache | None = None  # the running answers' KV, one row each
        self.started: dict[Answer, DynamicCache] = {}  # a prompt's KV, between `start` and `enter` or `leave`

    def fits(self, answers: list[Answer]) -> bool:
        longest = max(len(answer.input_ids) + answer.options.max_new_tokens for answer in answers) + ROOM
        return len(answers) * longest * self.position_bytes <= self.kv_bytes

    @torch.no_grad()
    def start(self, answer: Answer) -> torch.Tensor:
        past = self.prefixes.take(answer.input_ids, answer.image_key)
        self.started[answer], logits = self.model.prefill(answer.input_ids, answer.image_embeds, past)
        return logits

    def enter(self, answer: Answer, running: list[Answer]) -> None:
        self._place([*running, answer], [*self._rows(running), _layers(self.started.pop(answer))])

    @torch.no_grad()
    def step(self, running: list[Answer]) -> torch.Tensor:
        tokens = torch.tensor([[answer.tokens[-1]] for answer in running])
        columns = self.cache.get_seq_length() + 1
        mask = torch.zeros(len(running), columns, dtype=torch.long)
        for row, answer in enumerate(running):
            mask[row, columns - answer.positions - 1 :] = 1
        output = self.model.language_model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=torch.tensor([[answer.positions] for answer in running]),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1]

    def leave(self, complete: list[Answer], running: list[Answer]) -> None:
        caches = self._rows(running)
        for answer in complete:
            self._keep(answer, caches[running.index(answer)])
        kept = [row for row, answer in enumerate(running) if answer not in complete]
        caches = [caches[row] for row in kept]  # the views of the rows that left go: `_place` frees as it goes
        self._place([running[row] for row in kept], caches)

    def set_aside(self, answer: Answer, keep: bool) -> None:
        cache = self.started.pop(answer, None)
        if keep:
            self._keep(answer, cache)

    def reset(self) -> None:
        self.cache = None
        self.started.clear()

    def _rows(self, running: list[Answer]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Each running answer's KV cache, layer by layer, without its padding."""
        if self.cache is None:
            return []
        columns = self.cache.get_seq_length()
        rows = []
        for row, answer in enumerate(running):
            first = columns - answer.positions
            rows.append(
                [
                    (layer.keys[row : row + 1, :, first:], layer.values[row : row + 1, :, first:])
                    for layer in self.cache.layers
                ]
            )
        return rows

    def _place(self, answers: list[Answer], rows: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Lay out `answers`' KV caches (`rows`, used up) side by side, left padded so that each ends at the last
        column. Layer by layer, the old layer is let go as the new one is made: the batch's KV is never twice held."""
        old, self.cache = self.cache, None
        if not answers:
            return
        columns = max(answer.positions for answer in answers)
        layers = []
        for index in range(len(rows[0])):
            padded = [[_pad_left(tensor[0], columns) for tensor in row[index]] for row in rows]
            layer = GrowingLayer()
            layer.set(torch.stack([keys for keys, _ in padded]), torch.stack([values for _, values in padded]))
            layers.append(layer)
            del padded
            for row in rows:
                row[index] = None
            if old is not None:
                old.layers[index] = None
        self.cache = Cache(layers=layers)

    def _keep(self, answer: Answer, kv: list[tuple[torch.Tensor, torch.Tensor]] | DynamicCache) -> None:
        """`answer`'s KV cache (prompt and answer, the last token not fed) kept for a follow-up."""
        if not isinstance(kv, DynamicCache):
            kv = _dynamic(kv, self.model.language_model.config)
        self.prefixes.put([*answer.input_ids, *answer.tokens], answer.image_key, kv)


def _pad_left(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """(heads, positions, width) → (heads, columns, width), zeros before the positions."""
    return torch.nn.functional.pad(tensor, (0, 0, columns - tensor.shape[1], 0))


def kv_position_bytes(language_model: torch.nn.Module) -> int:
    """Bytes one position of one row takes in the KV cache: keys and values of every layer."""
    config = language_model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.finfo(language_model.dtype).bits // 8
    return 2 * config.num_hidden_layers * heads * width * element


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _dynamic(layers: list[tuple[torch.Tensor, torch.Tensor]], config) -> DynamicCache:
    """A transformers `DynamicCache` (what `PrefixCache` keeps) holding copies of these layers' keys and values."""
    cache = DynamicCache(config=config)
    for index, (keys, values) in enumerate(layers):
        cache.update(keys.clone(), values.clone(), index)
    return cache
