"""The app as users reach it: `python app.py` in a subprocess, driven by the real `gradio_client`."""

from __future__ import annotations

import time
import wave

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from inference.assistant import MAX_QUESTION_CHARS
from tests.kit import make_shape_image, serving_app

TOKENS = 8  # answer length for these tests: enough to see an answer, quick on the tiny model


@pytest.fixture(scope="module")
def server(weights_dir, whisper_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("app") / "app.log"
    with serving_app(["--weights", str(weights_dir), "--whisper", str(whisper_path)], log) as url:
        yield url


@pytest.fixture
def client(server) -> Client:
    return Client(server, verbose=False)  # a new client is a new session: a fresh conversation


@pytest.fixture(scope="module")
def files(tmp_path_factory, speech_wav):
    folder = tmp_path_factory.mktemp("uploads")
    make_shape_image("red", (160, 120)).save(folder / "shape.png")
    (folder / "picture.png").write_bytes((folder / "shape.png").read_bytes())  # same image, another name
    (folder / "notes.png").write_text("not an image")
    Image.new("L", (9000, 8000)).save(folder / "huge.png")  # 72 MP in a small file
    (folder / "notes.wav").write_text("not audio either")
    write_wav(folder / "silence.wav", np.zeros(16000 * 2))
    # 45 s of speech: longer than whisper's 30 s window.
    with wave.open(str(speech_wav)) as speech:
        rate, samples = speech.getframerate(), np.frombuffer(speech.readframes(speech.getnframes()), np.int16)
    repeats = int(45 * rate / len(samples)) + 1
    write_wav(folder / "long.wav", np.tile(samples / 32768.0, repeats), rate)
    return {path.name: handle_file(str(path)) for path in folder.iterdir()} | {"speech": handle_file(str(speech_wav))}


def write_wav(path, samples: np.ndarray, rate: int = 16000) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())


def ask(client: Client, image, text: str | None = None, audio=None, tokens: int = TOKENS) -> list[dict]:
    return client.predict(image, text, audio, tokens, 0.0, 1.0, api_name="/ask")


def text_of(message: dict) -> str:
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


def test_image_and_typed_question_get_an_answer(client, files):
    messages = ask(client, files["shape.png"], "What colour is the shape?")
    assert [message["role"] for message in messages] == ["user", "assistant"]
    assert text_of(messages[0]) == "What colour is the shape?"
    assert text_of(messages[1]).strip()


def test_spoken_question_appears_as_its_transcript(client, files):
    messages = ask(client, files["shape.png"], audio=files["speech"])
    question = text_of(messages[0])
    assert question.startswith("🎤 ") and len(question) > 2  # what whisper heard (random tiny weights)
    assert text_of(messages[1]).strip()


def test_multi_turn_keeps_the_conversation_and_clear_starts_over(client, files):
    first = ask(client, files["shape.png"], "What is it?")
    second = ask(client, files["picture.png"], "And where is it?")  # the same image, uploaded again
    assert len(second) == 4 and second[:2] == first
    assert text_of(second[2]) == "And where is it?"
    client.predict(api_name="/clear")
    assert len(ask(client, files["shape.png"], "What is it?")) == 2


def test_a_new_image_starts_a_new_conversation(client, files, tmp_path):
    ask(client, files["shape.png"], "What is it?")
    make_shape_image("blue", (160, 120)).save(tmp_path / "blue.png")
    assert len(ask(client, handle_file(str(tmp_path / "blue.png")), "What is it?")) == 2


def test_retry_replaces_the_last_answer(client, files):
    ask(client, files["shape.png"], "What is it?")
    answered = ask(client, files["shape.png"], "Is it round?")
    retried = client.predict(files["shape.png"], TOKENS, 0.0, 1.0, api_name="/retry")
    assert len(retried) == 4
    assert retried == answered  # greedy decoding: the same answer again, in the same place


def test_retry_with_nothing_to_retry_is_explained(client, files):
    with pytest.raises(AppError, match="no answer to retry"):
        client.predict(files["shape.png"], TOKENS, 0.0, 1.0, api_name="/retry")


BAD_INPUTS = {
    "no image": (None, "What is it?", None, "Upload an image first"),
    "no question": ("shape.png", "   ", None, "Type or record a question"),
    "unreadable image": ("notes.png", "What is it?", None, "not an image file"),
    "huge image": ("huge.png", "What is it?", None, r"9000×8000 \(72 MP\); the limit is 64 MP"),
    "non-audio file": ("shape.png", None, "notes.wav", "could not be read as audio"),
    "silent audio": ("shape.png", None, "silence.wav", "silent"),
    "very long text": ("shape.png", "why " * MAX_QUESTION_CHARS, None, f"limit is {MAX_QUESTION_CHARS}"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_gets_a_clear_message_and_the_server_keeps_serving(client, files, case):
    image, text, audio, message = BAD_INPUTS[case]
    with pytest.raises(AppError, match=message):
        ask(client, files.get(image), text, files.get(audio))
    assert text_of(ask(client, files["shape.png"], "What is it?")[-1]).strip()


def test_very_long_audio_is_trimmed_and_still_answered(client, files):
    messages = ask(client, files["shape.png"], audio=files["long.wav"])
    assert text_of(messages[0]).startswith("🎤 ") and text_of(messages[1]).strip()


def test_uploads_do_not_pile_up(weights_dir, whisper_path, speech_wav, tmp_path, monkeypatch):
    """Spoken questions are deleted once answered; images once older than UPLOAD_LIFETIME (here 2 s)."""
    uploads = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    monkeypatch.setenv("UPLOAD_LIFETIME", "2")
    images = []
    for number in range(5):
        path = tmp_path / f"upload-{number}.png"
        make_shape_image(["red", "green", "blue", "yellow", "white"][number], (64 + number, 64)).save(path)
        images.append(handle_file(str(path)))
    arguments = ["--weights", str(weights_dir), "--whisper", str(whisper_path)]
    with serving_app(arguments, tmp_path / "app.log") as url:
        client = Client(url, verbose=False)
        ask(client, images[0], audio=handle_file(str(speech_wav)))
        assert not list(uploads.rglob(speech_wav.name))  # answered: the recording is gone
        for image in images[1:]:
            ask(Client(url, verbose=False), image, "What is it?")
        assert list(uploads.rglob("upload-*.png"))  # kept while their conversations can go on
        deadline = time.monotonic() + 30
        while list(uploads.rglob("upload-*.png")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not list(uploads.rglob("upload-*.png"))  # swept once older than their lifetime
        ask(Client(url, verbose=False), images[0], "Still serving?")  # a new upload of the same image works


def test_visitors_asking_together_are_answered_as_each_alone(server, files, tmp_path):
    """Questions asked at once are decoded together (`inference.batching`); each gets the answer it gets alone."""
    colours = ("red", "green", "blue", "yellow")
    for colour in colours:
        make_shape_image(colour, (96, 96)).save(tmp_path / f"{colour}.png")
    clients = [Client(server, verbose=False) for _ in colours]
    jobs = [
        client.submit(
            handle_file(str(tmp_path / f"{colour}.png")), f"Is it {colour}?", None, 24, 0.0, 1.0, api_name="/ask"
        )
        for client, colour in zip(clients, colours, strict=True)
    ]
    together = [text_of(job.result(timeout=120)[-1]) for job in jobs]
    alone = [
        text_of(
            ask(
                Client(server, verbose=False),
                handle_file(str(tmp_path / f"{colour}.png")),
                f"Is it {colour}?",
                tokens=24,
            )[-1]
        )
        for colour in colours
    ]
    assert together == alone and all(together)


def test_beyond_the_queue_visitors_are_turned_away_and_the_rest_answered(weights_dir, whisper_path, files, tmp_path):
    log = tmp_path / "app.log"
    args = ["--weights", str(weights_dir), "--whisper", str(whisper_path), "--slots", "1"]
    with serving_app(args, log, env={"QUEUE_SIZE": "1"}) as url:
        long = 1024  # tokens, the most allowed: the first answer is still being written when the others arrive
        jobs = [Client(url, verbose=False).submit(files["shape.png"], "Why?", None, long, 0.0, 1.0, api_name="/ask")]
        deadline = time.monotonic() + 60
        while not jobs[0].outputs() and not jobs[0].done() and time.monotonic() < deadline:
            time.sleep(0.02)  # until its answer streams
        jobs += [
            Client(url, verbose=False).submit(files["shape.png"], "Why?", None, 8, 0.0, 1.0, api_name="/ask")
            for _ in range(3)
        ]
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(bool(text_of(job.result(timeout=300)[-1])))
            except Exception as error:  # gradio_client's QueueError or AppError, by version
                assert "queue is full" in str(error).lower()
                outcomes.append("full")
    assert outcomes[0] is True and outcomes.count(True) == 2 and outcomes.count("full") == 2  # one waited, two refused
