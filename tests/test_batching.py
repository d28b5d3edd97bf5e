"""Continuous batching (`inference.batching`): answers decoded together equal answers decoded alone."""

import threading
import weakref
from collections import Counter
from itertools import pairwise

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from inference.backends import pytorch
from inference.backends.joint import JointCache
from inference.backends.pytorch import ROOM, GrowingLayer, TorchBackend, TorchRows, kv_position_bytes
from inference.config import GenerationOptions
from inference.loading import load_weights
from inference.model import PrefixCache, cache_bytes, row_by_row_attention
from inference.precision import Precision
from tests.kit import ask_together, batch_sizes, four_requests, held, make_shape_image, pixels, prompt_ids, queued


def red_question(loaded) -> tuple[list[int], torch.Tensor]:
    """The prompt ids of a question about a red shape, and the image's embeddings."""
    model = loaded.model
    embeds = model.encode_images(pixels(model, make_shape_image("red")))
    return prompt_ids(loaded.tokenizer, "What colour is it?", loaded.manifest.image_tokens), embeds


def test_answers_decoded_together_equal_greedy_answers_decoded_alone(loaded):
    model = loaded.model
    backend = TorchBackend(model)
    sizes = batch_sizes(backend)
    requests = four_requests(loaded)
    alone = [model.generate(ids, embeds, options) for ids, embeds, options in requests]
    together = ask_together(backend, requests, held(backend))
    assert together == alone
    assert max(sizes) == len(requests) and min(sizes) < len(requests)  # batched, and rows left as they ended
    assert not backend.batcher.running and backend.batcher.rows.cache is None
    # Each answer's KV cache was kept: a follow-up computes only its new positions.
    ids = requests[1][0]
    follow_up = [*ids, *together[1], 5, 6, 7]
    assert backend.prefixes.covered(follow_up, "image 1") == len(ids) + len(together[1]) - 1


def test_a_stopped_answer_frees_its_slot_for_the_next_question(loaded):
    model = loaded.model
    backend = TorchBackend(model, slots=1)
    ids, embeds = red_question(loaded)
    stop = threading.Event()

    class StopAfterTwo:  # the visitor goes away after two tokens
        tokens = 0

        def put(self, value):
            self.tokens += value.numel()
            if self.tokens >= 2:
                stop.set()

        def end(self):
            pass

    long, short = GenerationOptions(max_new_tokens=2048 - len(ids)), GenerationOptions(max_new_tokens=6)
    second = []
    release = held(backend)
    first = threading.Thread(target=lambda: backend.generate(ids, embeds, long, StopAfterTwo(), stop, "a"))
    first.start()
    queued(backend, 1)
    waiting = threading.Thread(target=lambda: second.append(backend.generate(ids, embeds, short, image_key="b")))
    waiting.start()
    queued(backend, 2)
    release.set()
    first.join(60)
    waiting.join(60)  # it had to wait for the one slot, which the stopped answer gave up
    assert not first.is_alive() and stop.is_set()
    assert second == [model.generate(ids, embeds, short)]


def test_an_error_reaches_its_caller_and_the_batcher_serves_on(loaded, monkeypatch):
    model = loaded.model
    backend = TorchBackend(model)
    ids, embeds = red_question(loaded)
    with pytest.raises(ValueError, match="image positions"):
        backend.generate(ids, None, GenerationOptions(max_new_tokens=4))  # no image for its positions
    with monkeypatch.context() as patch:
        patch.setattr(model.language_model, "forward", lambda *a, **k: (_ for _ in ()).throw(MemoryError("full")))
        with pytest.raises(MemoryError):
            backend.generate(ids, embeds, GenerationOptions(max_new_tokens=4))
    options = GenerationOptions(max_new_tokens=4)
    assert backend.generate(ids, embeds, options) == model.generate(ids, embeds, options)


def test_a_prompt_pass_that_fails_fails_its_question_and_leaves_the_running_answers_as_they_were(loaded, monkeypatch):
    model = loaded.model
    backend = TorchBackend(model)
    (ids, embeds, options), (other_ids, other_embeds, _) = four_requests(loaded)[:2]
    update = JointCache.update

    def fails_at_the_second_layer(cache, keys, values, layer, *args, **kwargs):
        if layer == 1:  # the first layer wrote the running row's new position
            raise MemoryError("full")
        return update(cache, keys, values, layer, *args, **kwargs)

    monkeypatch.setattr(JointCache, "update", fails_at_the_second_layer)
    answers, errors = [], []
    release = held(backend)
    running = threading.Thread(target=lambda: answers.append(backend.generate(ids, embeds, options, image_key="a")))
    running.start()
    queued(backend, 1)

    def join():
        try:
            backend.generate(other_ids, other_embeds, options, image_key="b")
        except MemoryError as error:
            errors.append(error)

    joining = threading.Thread(target=join)
    joining.start()
    queued(backend, 2)
    release.set()
    running.join(60)
    joining.join(60)
    assert len(errors) == 1  # the question whose prompt's pass failed hears of it
    assert answers == [model.generate(ids, embeds, options)]  # the running answer, its step taken again
    kept = {image: cache for _, image, cache in backend.prefixes.entries}["a"]
    assert {layer.keys.shape[2] for layer in kept.layers} == {len(ids) + len(answers[0]) - 1}  # every layer's


def test_sampled_answers_are_seeded_like_generate(loaded):
    model, tokenizer = loaded.model, loaded.tokenizer
    backend = TorchBackend(model)
    embeds = model.encode_images(pixels(model, make_shape_image("blue")))
    ids = prompt_ids(tokenizer, "What colour is it?", loaded.manifest.image_tokens)
    sample = GenerationOptions(max_new_tokens=16, temperature=1.5, repetition_penalty=1.3)
    torch.manual_seed(1)
    first = backend.generate(ids, embeds, sample)
    torch.manual_seed(1)
    assert backend.generate(ids, embeds, sample) == first
    assert first != backend.generate(ids, embeds, GenerationOptions(max_new_tokens=16))


def test_work_ahead_runs_between_steps_even_when_every_slot_is_taken(loaded):
    model = loaded.model
    backend = TorchBackend(model, slots=1)
    ids, embeds = red_question(loaded)
    stop = threading.Event()
    long = GenerationOptions(max_new_tokens=2048 - len(ids))
    answering = threading.Thread(target=lambda: backend.generate(ids, embeds, long, stop=stop, image_key="a"))
    answering.start()
    while not backend.batcher.running:
        threading.Event().wait(0.01)
    backend.prepare(ids[: ids.index(-200)])  # an upload read, or the system prompt: done while the answer goes on
    assert answering.is_alive() and backend.prefixes.pinned is not None
    stop.set()
    answering.join(60)


@pytest.mark.parametrize("rows", [1, 2])
def test_a_question_waits_while_the_batch_kv_cache_would_pass_its_budget(loaded, rows):
    model = loaded.model
    requests = four_requests(loaded)
    # Each row of the batch's cache is as long as its longest row, up to its length limit, with up to ROOM columns
    # of padding before it and ROOM to grow after it.
    longest = max(len(ids) + options.max_new_tokens for ids, _, options in requests) + 2 * ROOM
    budget = rows * longest * kv_position_bytes(model.language_model)  # room for `rows` such rows, not more
    backend = TorchBackend(model, kv_bytes=(budget, float("inf")))
    sizes = batch_sizes(backend)
    together = ask_together(backend, requests, held(backend))
    assert together == [model.generate(ids, embeds, options) for ids, embeds, options in requests]
    assert max(sizes) == rows  # with 1, each question alone: the budget never stops one from starting


def test_kept_kv_caches_stay_within_their_budget_the_oldest_going_first(loaded):
    model = loaded.model
    ids, _ = red_question(loaded)
    caches = [model.prefill(ids[: ids.index(-200) - cut])[0] for cut in (0, 1, 2)]  # text only, each its own
    sizes = [cache_bytes(cache) for cache in caches]
    assert len(set(sizes)) == 3 and all(size > 0 for size in sizes)
    prefixes = PrefixCache(8, budget=sizes[1] + sizes[2])
    for index, cache in enumerate(caches):
        prefixes.put(ids, f"image {index}", cache)
    assert [entry[1] for entry in prefixes.entries] == ["image 1", "image 2"]  # the first went
    assert sum(cache_bytes(entry[2]) for entry in prefixes.entries) <= prefixes.budget
    prefixes.budget = sizes[2] - 1
    prefixes.put(ids, "image 3", model.prefill(ids[:4])[0])  # a small one comes: only it fits
    assert [entry[1] for entry in prefixes.entries] == ["image 3"]


def test_the_batch_kv_cache_is_rebuilt_layer_by_layer_and_never_held_twice(loaded, monkeypatch):
    model = loaded.model
    backend = TorchBackend(model)
    place, set_layer = TorchRows._place, GrowingLayer.set
    old: list[weakref.ref] = []  # the batch's layer buffers before a join or a leave
    made: list[int] = []  # layers rebuilt so far in this `_place`
    seen: list[tuple[int, int]] = []  # per layer rebuilt: (earlier old layers still held, later ones still held)

    def watched_place(self, answers, rows):
        old[:] = [weakref.ref(layer.buffers[0]) for layer in self.cache.layers] if self.cache else []
        made[:] = [0]
        place(self, answers, rows)
        made.clear()

    def watched_set(self, keys, values, **sizes):
        if made and old:
            done = made[0]
            held = [ref() is not None for ref in old]
            seen.append((sum(held[:done]), sum(held[done:])))
            made[0] += 1
        set_layer(self, keys, values, **sizes)

    monkeypatch.setattr(TorchRows, "_place", watched_place)
    monkeypatch.setattr(GrowingLayer, "set", watched_set)
    requests = four_requests(loaded)
    together = ask_together(backend, requests, held(backend))
    assert together == [model.generate(ids, embeds, options) for ids, embeds, options in requests]
    layers = model.language_model.config.num_hidden_layers
    assert len(seen) >= layers  # a join or a leave laid out anew with a batch before it, at least
    assert all(earlier == 0 for earlier, _ in seen)  # each old layer went once its new one was made
    assert all(later == layers - index % layers for index, (_, later) in enumerate(seen))  # and not before


def test_the_batch_kv_buffers_never_grow_while_its_answers_decode(loaded, monkeypatch):
    """The batch is laid out with room for every answer to end, so a step never copies it into a larger buffer
    (at phi-2's size, the longest pause of a wave), even when the answers are longer than `ROOM`."""
    monkeypatch.setattr(pytorch, "ROOM", 2)
    grown, update = [], GrowingLayer.update

    def watched(self, *args, **kwargs):
        buffers = self.buffers
        output = update(self, *args, **kwargs)
        grown.append(self.buffers is not buffers)
        return output

    monkeypatch.setattr(GrowingLayer, "update", watched)
    model = loaded.model
    backend = TorchBackend(model)
    requests = four_requests(loaded)  # each answer longer than ROOM; the longest join last
    assert min(options.max_new_tokens for _, _, options in requests) > 2 * 2
    together = ask_together(backend, requests, held(backend))
    assert together == [model.generate(ids, embeds, options) for ids, embeds, options in requests]
    assert grown and not any(grown)


@pytest.mark.parametrize("room", [ROOM, 2])
def test_rows_join_and_leave_in_place_and_the_padding_stays_within_room(loaded, monkeypatch, room):
    """A question joins into a spare buffer row and an answer leaves by moving up the rows after it, with no new
    layout; with little room the buffers also grow, and a leave that would leave more than `ROOM` columns of
    padding lays the batch out anew."""
    monkeypatch.setattr(pytorch, "ROOM", room)
    model = loaded.model
    backend = TorchBackend(model)
    rows, calls, padding, columns = backend.batcher.rows, Counter(), [], []
    for owner, name in ((GrowingLayer, "put"), (GrowingLayer, "drop"), (TorchRows, "_place")):
        method = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda self, *a, _m=method, _n=name: (calls.update([_n]), _m(self, *a))[1])
    step = rows.step

    def watched(running):
        columns.append(rows.cache.get_seq_length())
        padding.append(columns[-1] - max(answer.positions for answer in running))
        return step(running)

    rows.step = watched
    requests = four_requests(loaded) * 2
    ids, embeds, _ = requests.pop(1)
    requests.insert(0, (ids, embeds, GenerationOptions(3)))  # the longest prompt first, and soon gone
    together = ask_together(backend, requests, held(backend))
    assert together == [model.generate(ids, embeds, options) for ids, embeds, options in requests]
    layers = model.language_model.config.num_hidden_layers
    assert calls["put"] >= layers and calls["drop"] >= layers  # joined and left in place, each at least once
    assert calls["_place"] < 2 * len(requests)  # fewer new layouts than joins and leaves
    assert max(padding) <= room
    if room < ROOM:  # the longest row left the others with more padding than room: laid out anew, narrower
        assert any(later < earlier for earlier, later in pairwise(columns))


def test_an_int8_row_computes_bit_for_bit_what_it_computes_alone(weights_dir):
    loaded = load_weights(weights_dir, precision=Precision.INT8)  # the served precision: exact products per row
    backend = TorchBackend(loaded.model)
    rows = backend.batcher.rows
    seen: dict[object, list[torch.Tensor]] = {}  # each answer's logits: its prompt's, then step by step
    joint = []  # the rows of each step taken in a joining question's prompt pass
    start, step = rows.start, rows.step

    def record(running, logits):
        for row, answer in enumerate(running):
            seen.setdefault(answer.image_key, []).append(logits[row].clone())

    def watched_start(answer, running):
        logits, stepped = start(answer, running)
        if stepped is not None:
            joint.append(len(running))
            record(running, stepped)
        record([answer], logits[None])
        return logits, stepped

    rows.start, rows.step = watched_start, lambda running: (record(running, logits := step(running)), logits)[1]
    requests = four_requests(loaded) * 2  # eight rows, their prompts left padded to the longest
    for index, (ids, embeds, options) in enumerate(requests):
        backend.generate(ids, embeds, options, image_key=f"alone {index}")
    assert not joint
    together = ask_together(backend, requests, held(backend))
    assert all(len(answer) > 1 for answer in together)
    assert len(joint) == len(requests) - 1 and max(joint) > 1  # each after the first joined in a prompt's pass
    for index in range(len(requests)):  # not only the same tokens: the same logits, to the last bit
        alone, batched = seen[f"alone {index}"], seen[f"image {index}"]
        assert len(alone) == len(batched) and all(torch.equal(a, b) for a, b in zip(alone, batched, strict=True))


def test_row_by_row_attention_is_sdpa_with_each_left_padded_row_computed_alone():
    module = torch.nn.Module()
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(3, 2, length, 8, generator=generator) for length in (1, 6, 6))
    mask = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., :2] = False  # left padding
    mask[2, ..., 1] = False  # a hole: computed with its mask
    rows, _ = row_by_row_attention(module, query, key, value, mask)
    batched, _ = sdpa_attention_forward(module, query, key, value, mask)
    torch.testing.assert_close(rows, batched)
    alone, _ = sdpa_attention_forward(module, query[1:2], key[1:2, :, 2:], value[1:2, :, 2:], None)
    assert torch.equal(rows[1:2], alone)


def test_serving_computes_phis_gelu_in_one_kernel_and_the_same_logits(weights_dir):
    loaded = load_weights(weights_dir, precision=Precision.FP32)  # as the served int8's activations
    model, language_model = loaded.model, loaded.model.language_model
    assert language_model.config.hidden_act == "gelu_new"  # phi's: eight elementwise operations
    ids, embeds = red_question(loaded)
    before = model.prefill(ids, embeds)[1]
    TorchBackend(model)
    activations = {
        type(module.activation_fn) for module in language_model.modules() if hasattr(module, "activation_fn")
    }
    assert activations == {type(ACT2FN["gelu_pytorch_tanh"])}
    torch.testing.assert_close(model.prefill(ids, embeds)[1], before)
