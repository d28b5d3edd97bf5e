import re

import gradio as gr
import pytest

import app
from inference import GenerationOptions
from tests.kit import make_shape_image


@pytest.fixture
def image_path(tmp_path):
    make_shape_image("red").save(tmp_path / "red.png")
    return str(tmp_path / "red.png")


def test_respond_streams_question_and_answer_into_the_chat(assistant, image_path):
    earlier = [app.Exchange("Hi?", "Hello.", app.upload_key(image_path))]
    updates = list(app.respond(assistant, image_path, "What is it?", None, earlier))
    assert len(updates) > 1
    messages, exchanges = updates[-1]
    assert messages[:2] == [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    assert messages[2] == {"role": "user", "content": "What is it?"}
    assert messages[3]["role"] == "assistant" and messages[3]["content"] == exchanges[-1].answer
    assert exchanges[0] == earlier[0] and exchanges[1].question == "What is it?"


def test_a_different_image_starts_a_new_conversation(assistant, image_path, tmp_path):
    make_shape_image("blue").save(tmp_path / "blue.png")
    earlier = [app.Exchange("Hi?", "Hello.", app.upload_key(image_path))]
    messages, exchanges = list(app.respond(assistant, str(tmp_path / "blue.png"), "What is it?", None, earlier))[-1]
    assert len(messages) == 2 and len(exchanges) == 1


def test_the_same_picture_in_another_file_continues_the_conversation(assistant, image_path, tmp_path):
    make_shape_image("red").save(tmp_path / "again.bmp")  # the same pixels, another format
    earlier = [app.Exchange("Hi?", "Hello.", app.upload_key(image_path))]
    messages, exchanges = list(app.respond(assistant, str(tmp_path / "again.bmp"), "What is it?", None, earlier))[-1]
    assert len(messages) == 4 and len(exchanges) == 2
    assert app.upload_key(str(tmp_path / "missing.png")) == ""


def test_spoken_questions_are_marked_and_notices_become_warnings(assistant, image_path, speech_wav, monkeypatch):
    monkeypatch.setattr(assistant.transcriber, "max_seconds", 0.5)  # the recording is longer: trimmed
    with pytest.warns(UserWarning, match="first 0.5 s"):
        messages, exchanges = list(app.respond(assistant, image_path, None, str(speech_wav), []))[-1]
    assert exchanges[0].spoken and messages[0]["content"] == f"🎤 {exchanges[0].question}"


def test_an_uploaded_image_is_read_before_its_question(assistant, image_path, tmp_path, monkeypatch):
    read = []
    monkeypatch.setattr(assistant, "look", read.append)
    app.read_upload(assistant, image_path)
    assert len(read) == 1 and app.image_key(read[0]) == app.upload_key(image_path)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for nothing in (None, str(tmp_path / "missing.png"), str(tmp_path / "bad.png")):
        app.read_upload(assistant, nothing)
    assert len(read) == 1


def test_user_errors_become_readable_gradio_errors(assistant):
    with pytest.raises(gr.Error, match="Upload an image"):
        list(app.respond(assistant, None, "What is it?", None, []))


def test_invalid_settings_are_explained():
    with pytest.raises(gr.Error, match="top_p"):
        app.generation_options(GenerationOptions(), 64, 0.5, 0.0)


def test_demo_builds_over_an_assistant(assistant):
    demo = app.build_demo(assistant)
    assert isinstance(demo, gr.Blocks)
    headers = [block.value for block in demo.blocks.values() if isinstance(block, gr.Markdown)]
    assert any("tiny-test-weights" in header and "LoRA" in header for header in headers)
    assert not any("Demo mode" in header for header in headers)


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("WEIGHTS", "some/folder")
    monkeypatch.setenv("DEMO", "1")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = app.parse_args([])
    assert (args.weights, args.demo, args.host, args.port, args.share) == ("some/folder", True, "0.0.0.0", 7999, False)
    assert app.parse_args(["--weights", "other"]).weights == "other"


def test_startup_without_weights_says_what_to_do_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        app.main(["--weights", str(tmp_path / "missing")])
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert re.search(r"error: cannot start: .*missing does not exist.*--weights.*--demo", line)
