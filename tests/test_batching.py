"""Continuous batching (`inference.batching`): answers decoded together equal answers decoded alone."""

import threading

import pytest
import torch

from inference.backends.pytorch import TorchBackend
from inference.config import GenerationOptions
from tests.kit import make_shape_image, pixels, prompt_ids

QUESTIONS = ("What colour is it?", "Where is the shape in the picture, and how large is it?", "Round?", "Why?")
COLOURS = ("red", "blue", "green", "yellow")


def held(backend: TorchBackend) -> threading.Event:
    """Keep the batcher busy until the returned event is set, so that what is asked meanwhile waits together."""
    release, started = threading.Event(), threading.Event()
    threading.Thread(target=backend.batcher.call, args=(lambda: (started.set(), release.wait()),), daemon=True).start()
    started.wait()
    return release


def red_question(loaded) -> tuple[list[int], torch.Tensor]:
    """The prompt ids of a question about a red shape, and the image's embeddings."""
    model = loaded.model
    embeds = model.encode_images(pixels(model, make_shape_image("red")))
    return prompt_ids(loaded.tokenizer, "What colour is it?", loaded.manifest.image_tokens), embeds


def queued(backend: TorchBackend, count: int) -> None:
    while len(backend.batcher.waiting) < count:
        threading.Event().wait(0.01)


def ask_together(backend, requests, release) -> list:
    """Ask each (ids, image_embeds, options, stop) on its own thread while the batcher is held; then release it."""
    answers = [None] * len(requests)

    def ask(index, ids, embeds, options, stop=None):
        answers[index] = backend.generate(ids, embeds, options, stop=stop, image_key=f"image {index}")

    threads = [threading.Thread(target=ask, args=(index, *request)) for index, request in enumerate(requests)]
    for thread in threads:
        thread.start()
    queued(backend, len(requests))
    release.set()
    for thread in threads:
        thread.join(60)
    return answers


def test_answers_decoded_together_equal_greedy_answers_decoded_alone(loaded):
    model, tokenizer = loaded.model, loaded.tokenizer
    backend = TorchBackend(model)
    sizes = []
    step = backend.batcher._step
    backend.batcher._step = lambda: (sizes.append(len(backend.batcher.running)), step())[1]
    requests = []
    for index, (question, colour) in enumerate(zip(QUESTIONS, COLOURS, strict=True)):
        embeds = model.encode_images(pixels(model, make_shape_image(colour)))
        # Different prompt lengths and answer lengths, so rows join and leave at different steps.
        requests.append(
            (prompt_ids(tokenizer, question, loaded.manifest.image_tokens), embeds, GenerationOptions(8 + 4 * index))
        )
    alone = [model.generate(ids, embeds, options) for ids, embeds, options in requests]
    together = ask_together(backend, requests, held(backend))
    assert together == alone
    assert max(sizes) == len(requests) and min(sizes) < len(requests)  # batched, and rows left as they ended
    assert not backend.batcher.running and backend.batcher.cache is None
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
