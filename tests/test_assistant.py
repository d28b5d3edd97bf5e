import io
import itertools

import pytest
from PIL import Image

from inference import Assistant, GenerationOptions, InputError
from inference.config import TemplateName
from inference.prompt import Conversation, Turn, render
from tests.kit import make_shape_image

SHORT = GenerationOptions(max_new_tokens=8)


def count_image_encodings(assistant):
    calls = []
    assistant.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_chat_streams_a_growing_answer_to_a_typed_question(assistant):
    replies = list(assistant.chat([], make_shape_image("red"), text="  What is in this picture?  ", options=SHORT))
    assert replies[0].answer == "" and all(reply.question == "What is in this picture?" for reply in replies)
    answers = [reply.answer for reply in replies]
    assert all(longer.startswith(shorter) for shorter, longer in itertools.pairwise(answers))
    assert replies[-1].transcript is None and replies[-1].notice is None
    # The answer is what the model generates for the rendered prompt, decoded.
    prompt = render(
        TemplateName.PHI2_CHAT,
        Conversation((Turn("What is in this picture?"),)),
        assistant.tokenizer,
        add_generation_prompt=True,
    )
    tokens = assistant.model.generate(prompt.input_ids, assistant.image_embeds(make_shape_image("red")), SHORT)
    assert replies[-1].answer == assistant.tokenizer.decode(tokens, skip_special_tokens=True)


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


def test_follow_up_questions_reuse_the_kv_cache_and_answer_as_without_it(loaded):
    reusing = Assistant(loaded.model, loaded.tokenizer, loaded.manifest)
    image, history, reused = make_shape_image("blue"), [], []
    options = GenerationOptions(max_new_tokens=12)
    for question in ("What colour is it?", "Where is it?", "Is it round?"):
        answer = list(reusing.chat(history, image, text=question, options=options))[-1].answer
        reused.append(reusing.prefixes.reused)
        fresh = Assistant(loaded.model, loaded.tokenizer, loaded.manifest)  # nothing cached
        assert list(fresh.chat(history, image, text=question, options=options))[-1].answer == answer
        history.append((question, answer))
    first_prompt = len(reusing._prompt([], "What colour is it?", options)[0]) + loaded.manifest.image_tokens - 1
    assert reused[0] == 0 and reused[1] >= first_prompt and reused[2] > reused[1]
    # Another image: only the text before the image (the system prompt) is shared.
    list(reusing.chat([], make_shape_image("green"), text="What colour is it?", options=options))
    assert 0 < reusing.prefixes.reused < first_prompt - loaded.manifest.image_tokens
