"""The PyTorch backend: `MultimodalPhi` (the LoRA merged), concurrent answers decoded together (`Batcher` over
`TorchRows`, the batch's KV caches), with a cache of recent answers' KV caches."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import Cache, DynamicCache
from transformers.activations import ACT2FN, NewGELUActivation
from transformers.cache_utils import DynamicLayer

from inference import decode_attention
from inference.backends import SLOTS, LoadedBackend
from inference.backends.joint import prompt_and_step
from inference.batching import Answer, Batcher, T
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


ROOM = 64  # positions a KV buffer has beyond what its rows will need, so that questions joining later fit too


class GrowingLayer(DynamicLayer):
    """One layer's KV in a buffer with room to grow: a step writes its position in place, where transformers'
    `DynamicLayer` concatenates (copying the whole cache of every row, every token). The buffer may have rows
    to spare, so that a row joins or leaves by copying only what moves (`put`, `move`, `drop`)."""

    def __init__(self) -> None:
        super().__init__()
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.length = 0
        self.rows = 0

    def set(self, keys: torch.Tensor, values: torch.Tensor, capacity: int = 0, room: int = ROOM) -> None:
        """Hold `keys`/`values` (batch, heads, positions, width) with `room` positions after them, in a buffer of at
        least `capacity` rows. A row's room is written (zeros) when the row is, so that a step's write of its
        position does not fault in fresh pages (that made the write several times slower); rows to spare stay
        untouched."""
        self.rows, length = keys.shape[0], keys.shape[2]
        shape = (max(self.rows, capacity), keys.shape[1], length + room, keys.shape[3])
        self.buffers = (keys.new_empty(shape), values.new_empty(shape))
        for buffer, tensor in zip(self.buffers, (keys, values), strict=True):
            buffer[: self.rows, :, :length] = tensor
            buffer[: self.rows, :, length:] = 0
        self._view(length)

    def put(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A new last row: `keys`/`values` (heads, positions, width) ending at the last column, zeros around."""
        first = self.length - keys.shape[1]
        for buffer, tensor in zip(self.buffers, (keys, values), strict=True):
            buffer[self.rows, :, :first] = 0
            buffer[self.rows, :, first : self.length] = tensor
            buffer[self.rows, :, self.length :] = 0
        self.rows += 1
        self._view(self.length)

    def move(self, source: int, target: int) -> None:
        for buffer in self.buffers:
            buffer[target, :, : self.length] = buffer[source, :, : self.length]

    def drop(self, rows: int) -> None:
        """Keep the first `rows` rows."""
        self.rows = rows
        self._view(self.length)

    def cut(self, length: int) -> None:
        """Forget the positions after the first `length` (a step that failed part way)."""
        self._view(length)

    def spare(self) -> int:
        return self.buffers[0].shape[0] - self.rows

    def room(self) -> int:
        return self.buffers[0].shape[2] - self.length

    def _view(self, length: int) -> None:
        self.length = length
        self.keys, self.values = (buffer[: self.rows, :, :length] for buffer in self.buffers)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[2]
        if self.buffers is None or end > self.buffers[0].shape[2]:
            grown = (
                torch.cat([old, new], dim=2) for old, new in ((self.keys, key_states), (self.values, value_states))
            )
            self.set(*grown, capacity=0 if self.buffers is None else self.buffers[0].shape[0])
        else:
            self.buffers[0][: self.rows, :, self.length : end] = key_states
            self.buffers[1][: self.rows, :, self.length : end] = value_states
            self._view(end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


class TorchRows:
    """`Rows` for a `MultimodalPhi`: one KV cache for the batch, its rows left padded so that every row's newest
    position is the same column, each row's positions and mask its own (so a row computes what it would alone).
    A prompt is computed from the longest cached prefix (`PrefixCache`), in one pass with the running answers' next
    step (`start`); an answer's KV goes back there.
    The batch's KV is rows × its longest row: `fits` holds it, every row at its length limit, within `kv_bytes`.

    A question joins in place (`_fits_in_place`: a buffer row to spare, its prompt no longer than the batch's rows,
    room for the answers after them), an answer leaves by moving up the rows after it: only the rows that move are
    copied. Otherwise, or once every row has more than `ROOM` columns of padding, the batch is laid out anew,
    its buffers with rows for `slots` answers (written only when used) and positions for every answer to end."""

    def __init__(self, model: MultimodalPhi, prefixes: PrefixCache, kv_bytes: float = float("inf"), slots: int = SLOTS):
        self.model, self.prefixes, self.kv_bytes, self.slots = model, prefixes, kv_bytes, slots
        self.position_bytes = kv_position_bytes(model.language_model)
        self.cache: Cache | None = None  # the running answers' KV, one row each
        self.started: dict[Answer, DynamicCache] = {}  # a prompt's KV, between `start` and `enter` or `leave`

    def fits(self, answers: list[Answer]) -> bool:
        # Each row at its limit, up to ROOM columns of padding before it (`leave`) and the buffer's ROOM after.
        longest = max(len(answer.input_ids) + answer.options.max_new_tokens for answer in answers) + 2 * ROOM
        return len(answers) * longest * self.position_bytes <= self.kv_bytes

    @torch.no_grad()
    def start(self, answer: Answer, running: list[Answer]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's pass; the running answers' next step in the same one (`inference.backends.joint`)."""
        past = self.prefixes.take(answer.input_ids, answer.image_key)
        if not running:
            self.started[answer], logits = self.model.prefill(answer.input_ids, answer.image_embeds, past)
            return logits, None
        cache = past if past is not None else DynamicCache(config=self.model.language_model.config)
        embeds = self.model.prompt_embeds(answer.input_ids, answer.image_embeds, cache)
        columns = self.cache.get_seq_length()
        try:
            logits, stepped = prompt_and_step(
                self.model.language_model,
                embeds,
                cache,
                [row.tokens[-1] for row in running],
                [row.positions for row in running],
                self.cache,
                self._starts(running),
            )
        except BaseException:
            for layer in self.cache.layers:  # the running rows as they were: their step is taken again
                layer.cut(columns)
            raise
        self.started[answer] = cache
        return logits, stepped

    def enter(self, answer: Answer, running: list[Answer]) -> None:
        layers = _layers(self.started.pop(answer))
        if self._fits_in_place(answer, running):
            for layer, (keys, values) in zip(self.cache.layers, layers, strict=True):
                layer.put(keys[0], values[0])
        else:
            self._place([*running, answer], [*self._rows(running), layers])

    def _fits_in_place(self, answer: Answer, running: list[Answer]) -> bool:
        """Whether `answer` may join into a spare buffer row: its prompt fits before the last column, and the room
        after it is what a new layout would give the batch's answers to end in (less the ROOM for later questions)."""
        if self.cache is None:
            return False
        layer = self.cache.layers[0]
        columns = layer.length
        return (
            bool(layer.spare())
            and answer.positions <= columns
            and layer.room() >= self._room([*running, answer], columns) - ROOM
        )

    @torch.no_grad()
    def step(self, running: list[Answer]) -> torch.Tensor:
        tokens = torch.tensor([[answer.tokens[-1]] for answer in running])
        columns, starts = self.cache.get_seq_length() + 1, self._starts(running)
        mask = torch.zeros(len(running), columns, dtype=torch.long)
        for row, first in enumerate(starts):
            mask[row, first:] = 1
        output = self.model.language_model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=torch.tensor([[answer.positions] for answer in running]),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
            row_starts=starts,  # for `row_by_row_attention`: the mask's, read once
        )
        return output.logits[:, -1]

    def _starts(self, running: list[Answer]) -> list[int]:
        """Each row's first column, at the next step: its padding, then its positions and the new one."""
        return [self.cache.get_seq_length() - answer.positions for answer in running]

    def leave(self, complete: list[Answer], running: list[Answer]) -> None:
        caches = self._rows(running)
        for answer in complete:
            self._keep(answer, caches[running.index(answer)])
        kept = [row for row, answer in enumerate(running) if answer not in complete]
        longest = max((running[row].positions for row in kept), default=0)
        if not kept or longest + ROOM < self.cache.get_seq_length():  # padding to drop: laid out anew
            caches = [caches[row] for row in kept]  # the views of the rows that left go: `_place` frees as it goes
            return self._place([running[row] for row in kept], caches)
        for layer in self.cache.layers:
            for target, source in enumerate(kept):
                if source != target:
                    layer.move(source, target)
            layer.drop(len(kept))

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
        room = self._room(answers, columns)
        layers = []
        for index in range(len(rows[0])):
            padded = [[_pad_left(tensor[0], columns) for tensor in row[index]] for row in rows]
            layer = GrowingLayer()
            keys, values = torch.stack([keys for keys, _ in padded]), torch.stack([values for _, values in padded])
            layer.set(keys, values, capacity=self._capacity(len(answers), columns + room), room=room)
            del keys, values
            layers.append(layer)
            del padded
            for row in rows:
                row[index] = None
            if old is not None:
                old.layers[index] = None
        self.cache = Cache(layers=layers)

    @staticmethod
    def _room(answers: list[Answer], columns: int) -> int:
        """Positions after the last column for a batch of `answers`: every answer's remaining tokens and `ROOM` for
        the questions that join later, so that the buffers need not grow (copying every row's cache: at phi-2's size,
        the longest pause of a wave). Within what `fits` counts: the longest row at its limit, `ROOM` of padding and
        `ROOM` after."""
        remaining = max(answer.options.max_new_tokens - len(answer.tokens) for answer in answers)
        limit = max(len(answer.input_ids) + answer.options.max_new_tokens for answer in answers) + 2 * ROOM
        return min(remaining + ROOM, limit - columns)  # at least ROOM: columns ≤ the longest row + ROOM of padding

    def _capacity(self, rows: int, length: int) -> int:
        """Buffer rows for a batch of `rows` now: up to `slots`, while that many of `length` fit in `kv_bytes`."""
        return int(max(rows, min(self.slots, self.kv_bytes / (length * self.position_bytes))))

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


class TorchBackend:
    """`inference.backends.ServingBackend` over a `MultimodalPhi`: up to `slots` answers decoded together, every
    computation on the batcher's thread (the model's loading when `load_torch` loads it, images, speech through
    `call`); follow-up turns reuse the KV cache of earlier ones (`PrefixCache`)."""

    def __init__(
        self,
        model: MultimodalPhi,
        precision: Precision | None = None,
        slots: int = SLOTS,
        kv_bytes: tuple[float, float] = (RUNNING_KV_BYTES, KEPT_KV_BYTES),
        batcher: Batcher | None = None,
    ) -> None:
        self.model = model.eval()
        model.language_model.set_attn_implementation(ROW_BY_ROW)  # an answer is the same whoever else asks
        decode_attention.kernel()  # built now, not while the first answer waits for its second token
        one_kernel_gelu(model.language_model)
        self.precision = precision  # how it was loaded, when known
        self.prefixes = PrefixCache(PREFIX_CACHES, budget=kv_bytes[1])
        self.batcher = batcher or Batcher(slots=slots)  # the one that loaded `model`, when given (`load_torch`)
        self.batcher.rows = TorchRows(self.model, self.prefixes, kv_bytes[0], slots)
        self.batcher.slots, self.batcher.eos_token_id = slots, model.eos_token_id
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
        return self.batcher.call(torch.no_grad()(lambda: self.model.encode_images(pixel_values)))

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
        return self.batcher.generate(input_ids, image_embeds, options, streamer, stop, image_key)


def one_kernel_gelu(language_model: torch.nn.Module) -> None:
    """phi's activation, transformers' `gelu_new`, computes the tanh GELU in eight elementwise operations; torch's
    own computes the same function in one kernel (equal to rounding), which a decode step of eight rows feels."""
    for module in language_model.modules():
        if isinstance(getattr(module, "activation_fn", None), NewGELUActivation):
            module.activation_fn = ACT2FN["gelu_pytorch_tanh"]


def load_torch(
    weights: str | Path, precision: Precision, int8_cache: Path | None, slots: int | None = None
) -> LoadedBackend:
    """A weights folder in PyTorch in `precision`; int8 is quantized once and kept (`int8_location`)."""
    folder = resolve_weights(weights)
    int8_path = int8_location(folder, Manifest.load(folder), int8_cache) if precision is Precision.INT8 else None
    batcher = Batcher(slots=slots or SLOTS)  # its thread loads the model and computes everything after
    loaded = batcher.call(lambda: load_weights(folder, precision=precision, int8_path=int8_path))
    backend = TorchBackend(loaded.model, precision, slots or SLOTS, batcher=batcher)
    return LoadedBackend(backend, loaded.tokenizer, loaded.manifest)
