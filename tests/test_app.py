import gradio as gr
import pytest

import app
from tests.kit import make_shape_image


def test_respond_streams_question_and_answer_into_the_chat(assistant):
    earlier = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    updates = list(app.respond(assistant, make_shape_image("red"), "What is it?", None, earlier))
    assert len(updates) > 1
    final = updates[-1]
    assert final[:2] == earlier
    assert final[2] == {"role": "user", "content": "What is it?"}
    assert final[3]["role"] == "assistant" and final[3]["content"]


def test_user_errors_become_readable_gradio_errors(assistant):
    with pytest.raises(gr.Error, match="Upload an image"):
        list(app.respond(assistant, None, "What is it?", None, []))


def test_history_pairs_skips_an_unanswered_question():
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert app.history_pairs(messages) == [("a", "b")]


def test_demo_builds_over_an_assistant(assistant):
    demo = app.build_demo(assistant)
    assert isinstance(demo, gr.Blocks)
    headers = [block.value for block in demo.blocks.values() if isinstance(block, gr.Markdown)]
    assert any("tiny-test-weights" in header and "LoRA" in header for header in headers)


def test_startup_without_weights_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match=r"(?s)Cannot start.*does not exist.*--weights"):
        app.main(["--weights", str(tmp_path / "missing")])
