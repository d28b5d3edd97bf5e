import io
import itertools
import logging
import threading
import warnings

import pytest
import torch
from PIL import Image
from transformers.utils import logging as transformers_logging

from inference import Assistant, GenerationOptions, InputError
from inference.backends.pytorch import TorchBackend
from inference.config import TemplateName
from inference.model import PrefixCache
from inference.prompt import Conversation, Turn, render
from tests.kit import REPO, make_shape_image, pixels, prompt_ids

SHORT = GenerationOptions(max_new_tokens=8)


def count_image_encodings(assistant):
    calls = []
    assistant.backend.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_chat_streams_a_growing_answer_to_a_typed_question(assistant):
    replies = list(assistant.chat([], make_shape_image("red"), text="  What is in this picture?  ", options=SHORT))
    assert replies[0].answer == "" and all(reply.question == "What is in this picture?" for reply in replies)
    answers = [reply.answer for reply in replies]
    assert all(longer.startswith(shorter) for shorter, longer in itertools.pairwise(answers))
    assert replies[-1].transcript is None and replies[-1].notice is None
    # The answer is what the model generates for the rendered prompt, decoded.
    model = assistant.backend.model
    image_embeds = model.encode_images(pixels(model, make_shape_image("red")))
    tokens = model.generate(prompt_ids(assistant.tokenizer), image_embeds, SHORT)
    # The answer is the decoded tokens without the space that follows "ASSISTANT:".
    assert replies[-1].answer == assistant.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()


def test_the_image_is_encoded_once_per_conversation(assistant):
    calls = count_image_encodings(assistant)
    image = make_shape_image("blue")
    history = []
    for question in ("What colour is it?", "Where is it?", "Is it round?"):
        answer = list(assistant.chat(history, image, text=question, options=SHORT))[-1].answer
        history.append((question, answer))
    assert len(calls) == 1
    same_pixels = Image.open(io.BytesIO(_png(image)))  # the same picture uploaded again
    list(assistant.chat([], same_pixels, text="Again?", options=SHORT))
    assert len(calls) == 1
    list(assistant.chat([], make_shape_image("green"), text="And this one?", options=SHORT))
    assert len(calls) == 2


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_spoken_question_is_answered_and_its_transcript_returned(assistant, speech_wav):
    replies = list(assistant.chat([], make_shape_image("red"), audio=str(speech_wav), options=SHORT))
    transcript = replies[-1].transcript
    assert transcript and replies[-1].question == transcript
    both = list(assistant.chat([], make_shape_image("red"), text="Typed.", audio=str(speech_wav), options=SHORT))
    assert both[-1].question == f"Typed. {transcript}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image": None, "text": "What?"}, "Upload an image"),
        ({"text": "   "}, "Type or record a question"),
        ({"text": "x" * 5000}, "5000 characters"),
        ({"image": Image.new("RGB", (0, 0))}, "could not be used"),
    ],
)
def test_user_mistakes_raise_input_error_with_a_readable_message(assistant, kwargs, message):
    kwargs = {"image": make_shape_image("red"), "text": "What?"} | kwargs
    with pytest.raises(InputError, match=message):
        list(assistant.chat([], options=SHORT, **kwargs))


def test_non_audio_upload_is_an_input_error(assistant, tmp_path):
    fake = tmp_path / "photo.mp3"
    fake.write_bytes(b"\x89PNG not audio at all")
    with pytest.raises(InputError, match="audio could not be used"):
        list(assistant.chat([], make_shape_image("red"), audio=str(fake), options=SHORT))


def test_oldest_history_is_dropped_when_the_context_is_full(assistant):
    context = assistant.max_positions
    long_answer = "A red circle on the left. " * 60  # hundreds of tokens per exchange
    history = [(f"Question {i}?", long_answer) for i in range(12)]
    options = GenerationOptions(max_new_tokens=256)
    reply = next(assistant.chat(history, make_shape_image("red"), text="And now?", options=options))
    assert "oldest exchange(s)" in reply.notice
    dropped = int(reply.notice.split()[1])
    assert 0 < dropped < len(history)
    with pytest.raises(InputError, match="too long"):
        next(
            assistant.chat(
                [], make_shape_image("red"), text="why " * 450, options=GenerationOptions(max_new_tokens=2048)
            )
        )
    assert context == 2048


def reused_positions(prefixes: PrefixCache, monkeypatch) -> list[int]:
    """Records how many positions each `take` hands back already computed."""
    reused, take = [], prefixes.take

    def recording_take(input_ids, image_key):
        cache = take(input_ids, image_key)
        reused.append(0 if cache is None else cache.get_seq_length())
        return cache

    monkeypatch.setattr(prefixes, "take", recording_take)
    return reused


def test_follow_up_questions_reuse_the_kv_cache_and_answer_as_without_it(loaded, monkeypatch):
    reusing = Assistant(TorchBackend(loaded.model), loaded.tokenizer, loaded.manifest)
    reused = reused_positions(reusing.backend.prefixes, monkeypatch)
    image, history = make_shape_image("blue"), []
    options = GenerationOptions(max_new_tokens=12)
    for question in ("What colour is it?", "Where is it?", "Is it round?"):
        answer = list(reusing.chat(history, image, text=question, options=options))[-1].answer
        fresh = Assistant(TorchBackend(loaded.model), loaded.tokenizer, loaded.manifest)  # nothing cached
        assert list(fresh.chat(history, image, text=question, options=options))[-1].answer == answer
        history.append((question, answer))
    first_prompt = prompt_ids(loaded.tokenizer, "What colour is it?", loaded.manifest.image_tokens)
    assert reused[0] == 0 and reused[1] >= len(first_prompt) and reused[2] > reused[1]
    # Another image: only the text before the image (the system prompt) is shared.
    list(reusing.chat([], make_shape_image("green"), text="What colour is it?", options=options))
    assert 0 < reused[3] == first_prompt.index(-200)


def test_warm_computes_the_system_prompt_once_and_a_new_image_leaves_other_conversations_cached(loaded, monkeypatch):
    warmed = Assistant(TorchBackend(loaded.model), loaded.tokenizer, loaded.manifest)
    warmed.warm()
    first_prompt = prompt_ids(loaded.tokenizer, "What colour is it?", loaded.manifest.image_tokens)
    system = first_prompt[: first_prompt.index(-200)]
    assert warmed.backend.prefixes.pinned[0] == system and not warmed.backend.prefixes.entries
    reused = reused_positions(warmed.backend.prefixes, monkeypatch)
    options = GenerationOptions(max_new_tokens=12)
    blue, green = make_shape_image("blue"), make_shape_image("green")
    answer = list(warmed.chat([], blue, text="What colour is it?", options=options))[-1].answer
    fresh = Assistant(TorchBackend(loaded.model), loaded.tokenizer, loaded.manifest)  # nothing computed before
    assert list(fresh.chat([], blue, text="What colour is it?", options=options))[-1].answer == answer
    assert reused == [len(system)]  # the first visitor's question already found the system prompt
    # A second visitor with another image takes a copy of the system prompt, not the first visitor's cache,
    list(warmed.chat([], green, text="What colour is it?", options=options))
    assert reused[1] == len(system) and warmed.backend.prefixes.pinned[1].get_seq_length() == len(system)
    # so the first visitor's follow-up still reuses all of their first turn.
    list(warmed.chat([("What colour is it?", answer)], blue, text="Where is it?", options=options))
    assert reused[2] >= len(first_prompt) > len(system)


def test_an_image_read_on_upload_leaves_its_question_only_its_own_positions(loaded, monkeypatch):
    reading = Assistant(TorchBackend(loaded.model), loaded.tokenizer, loaded.manifest)
    reading.warm()
    reused = reused_positions(reading.backend.prefixes, monkeypatch)
    blue, options = make_shape_image("blue"), GenerationOptions(max_new_tokens=12)
    reading.look(blue)  # as the app does on upload
    answer = list(reading.chat([], blue, text="What colour is it?", options=options))[-1].answer
    fresh = Assistant(TorchBackend(loaded.model), loaded.tokenizer, loaded.manifest)
    assert list(fresh.chat([], blue, text="What colour is it?", options=options))[-1].answer == answer
    first_prompt = prompt_ids(loaded.tokenizer, "What colour is it?", loaded.manifest.image_tokens)
    image_end = first_prompt.index(-200) + loaded.manifest.image_tokens
    assert reused[0] == first_prompt.index(-200) and reused[1] >= image_end  # the question found the image read
    reading.look(blue)  # again: the conversation already holds it, and keeps its cache for a follow-up
    reading.look(Image.new("RGB", (0, 0)))  # unusable: left for the question to refuse
    assert len(reused) == 2 and len(reading.backend.prefixes.entries) == 1


def overfit(model, tokenizer, conversation, image, steps=150):
    """Train the tiny model on one example until it repeats the answer (and its end token) greedily."""
    rendered = render(TemplateName.PHI2_CHAT, conversation, tokenizer, image_tokens=model.vision_tower.num_patches)
    features = model.vision_tower(pixels(model, image))
    parameters = [*model.language_model.parameters(), *model.projector.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)  # peft leaves the merged base model frozen
    optimizer = torch.optim.Adam(parameters, lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model([rendered.input_ids], [rendered.labels], image_features=features).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()


def test_streaming_grows_the_answer_and_stops_at_end_of_text(assistant):
    answer = "A red circle on the left."
    image = make_shape_image("red")
    conversation = Conversation((Turn("What is in this picture?", answer),))
    model, loss = overfit(assistant.backend.model, assistant.tokenizer, conversation, image)
    assert loss < 0.05
    options = GenerationOptions(max_new_tokens=64)

    texts = [reply.answer for reply in assistant.chat([], image, text="What is in this picture?", options=options)]
    assert texts[-1].strip() == answer
    assert len(texts) > 2
    for shorter, longer in itertools.pairwise(texts[1:]):
        assert longer.startswith(shorter) and len(longer) > len(shorter)
    tokens = model.generate(prompt_ids(assistant.tokenizer), model.encode_images(pixels(model, image)), options)
    assert tokens[-1] == model.eos_token_id and len(tokens) < options.max_new_tokens
    assert assistant.tokenizer.decode(tokens[:-1]).strip() == answer


def test_a_follow_up_is_rendered_as_training_renders_it_and_reuses_the_answer(assistant, monkeypatch):
    """Turn 2's prompt is `render()` of the conversation with the model's own answer, and the KV cache of
    turn 1 (its prompt and its answer) is reused, not only its prompt."""
    image, first, second = make_shape_image("red"), "What is in this picture?", "Where is it?"
    overfit(assistant.backend.model, assistant.tokenizer, Conversation((Turn(first, "A red circle."),)), image)
    backend = assistant.backend
    prompts, generate = [], backend.generate
    monkeypatch.setattr(backend, "generate", lambda ids, *args: prompts.append(list(ids)) or generate(ids, *args))
    reused = reused_positions(assistant.backend.prefixes, monkeypatch)
    options = GenerationOptions(max_new_tokens=16)
    answer = list(assistant.chat([], image, text=first, options=options))[-1].answer
    list(assistant.chat([(first, answer)], image, text=second, options=options))

    tokenizer, patches = assistant.tokenizer, assistant.manifest.image_tokens
    conversation = Conversation((Turn(first, answer), Turn(second)))
    assert prompts[1] == render(TemplateName.PHI2_CHAT, conversation, tokenizer, True, image_tokens=patches).input_ids
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    assert prompts[1][: len(prompts[0]) + len(answer_ids)] == prompts[0] + answer_ids
    assert reused[1] == len(prompts[0]) + len(answer_ids)  # everything turn 1 computed, its answer included
    assert answer == "A red circle."  # no leading space: the template adds the one after "ASSISTANT:"


def test_closing_the_stream_stops_generation(assistant):
    replies = assistant.chat([], make_shape_image("red"), text="What?", options=GenerationOptions(max_new_tokens=256))
    next(replies)  # the empty reply, before generation starts
    next(replies)  # the first piece of the answer
    before = {thread for thread in threading.enumerate() if thread.name == "generate"}
    assert before
    replies.close()
    assert not any(thread.is_alive() for thread in before)


def test_errors_in_generation_reach_the_reader(assistant, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the model failed")

    monkeypatch.setattr(assistant.backend.model.language_model, "forward", broken)  # on the batcher's thread
    with pytest.raises(RuntimeError, match="the model failed"):
        list(assistant.chat([], make_shape_image("red"), text="What?", options=SHORT))


def test_a_conversation_takes_no_deprecated_transformers_path(loaded):
    """Deprecations are warnings (FutureWarning) or messages through transformers' logger, logged once per
    process: the once-only memory is cleared, so an earlier test cannot hide one."""
    transformers_logging.warning_once.cache_clear()
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = transformers_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assistant = Assistant(TorchBackend(loaded.model), loaded.tokenizer, loaded.manifest)
            history, image = [], make_shape_image("red")
            for question in ("What is it?", "Where is it?"):  # the second reuses the first's KV cache
                answer = list(assistant.chat(history, image, text=question, options=SHORT))[-1].answer
                history.append((question, answer))
    finally:
        logger.removeHandler(handler)
    future = [
        str(warning.message) for warning in caught if issubclass(warning.category, FutureWarning | DeprecationWarning)
    ]
    assert not future
    assert not [message for message in messages if "deprecat" in message.lower()]


ONE_COMPUTING_THREAD = """
import os, sys, threading
from pathlib import Path
import torch
from inference import Assistant

def native_threads():  # OS threads that are not Python's
    python = {thread.native_id for thread in threading.enumerate()}
    return len([task for task in os.listdir("/proc/self/task") if int(task) not in python])

torch.set_num_threads(2)  # and its other pool (pthreadpool's), made now
before = native_threads()

def pool_threads():  # native threads beyond those at the start: torch's OpenMP workers
    return native_threads() - before

weights, whisper, cache, image, audio = sys.argv[1:]
assistant = Assistant.load(weights, whisper_model=whisper, cache=Path(cache), threads=2)
counts = [pool_threads()]

def visitor(work):  # as gradio runs a question: on a thread of its own, still alive when counted
    done, leave = threading.Event(), threading.Event()
    def run():
        work()
        done.set()
        leave.wait()
    thread = threading.Thread(target=run)
    thread.start()
    done.wait()
    counts.append(pool_threads())
    leave.set()
    thread.join()

visitor(lambda: [reply for reply in assistant.chat([], image, "What is it?", audio)])
visitor(lambda: torch.ones(1 << 20).mul(2))  # the control: a thread's own parallel operation starts a pool
print(*counts)
"""


def test_all_torch_work_of_serving_runs_on_the_batchers_thread(weights_dir, whisper_path, speech_wav, tmp_path):
    """Loading, the image, the speech and the answer all on the one thread that computes answers: a pool of torch
    workers for any other thread (a visitor's) slows every decode step (`inference.batching`). In a fresh process,
    as the app runs; the control shows a visitor's own torch work would be seen."""
    import os
    import subprocess
    import sys

    image = tmp_path / "red.png"
    make_shape_image("red").save(image)
    command = [sys.executable, "-c", ONE_COMPUTING_THREAD, str(weights_dir), str(whisper_path), str(tmp_path / "cache")]
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}  # the tokenizers' own pool (not OpenMP) stays out
    result = subprocess.run(
        [*command, str(image), str(speech_wav)], capture_output=True, text=True, cwd=REPO, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded, asked, control = map(int, result.stdout.split()[-3:])
    assert loaded == 1  # the batcher's one worker (2 threads)
    assert asked == loaded
    assert control == loaded + 1
