"""Gradio Space: upload an image, ask about it by typing or speaking, and watch phi-2 answer.

A first, minimal layout over one `Assistant`; the app issue grows it (settings, examples, stop/retry).

    python app.py --weights weights/
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

import gradio as gr

from inference import Assistant, InputError
from inference.config import ManifestError

Messages = list[dict[str, str]]


def history_pairs(messages: Messages) -> list[tuple[str, str]]:
    """Gradio's chat messages → (question, answer) pairs, skipping an unanswered last question."""
    pairs = []
    for question, answer in zip(messages[::2], messages[1::2], strict=False):
        if question["role"] == "user" and answer["role"] == "assistant":
            pairs.append((question["content"], answer["content"]))
    return pairs


def respond(assistant: Assistant, image, text: str, audio: str | None, messages: Messages) -> Iterator[Messages]:
    """Stream the answer into the chat; a question the user can fix becomes a readable error, not a trace."""
    try:
        for reply in assistant.chat(history_pairs(messages), image, text=text, audio=audio):
            if reply.notice and not reply.answer:
                gr.Info(reply.notice)
            yield [
                *messages,
                {"role": "user", "content": reply.question},
                {"role": "assistant", "content": reply.answer},
            ]
    except InputError as error:
        raise gr.Error(str(error)) from None


def build_demo(assistant: Assistant) -> gr.Blocks:
    manifest = assistant.manifest
    with gr.Blocks(title="Ask about an image") as demo:
        gr.Markdown(
            f"## Ask about an image\nWeights **{manifest.name}**: {manifest.vision_model} → "
            f"{manifest.projector.type.value} projector → {manifest.language_model}"
            + (" + LoRA" if manifest.adapter else "")
        )
        with gr.Row():
            image = gr.Image(type="pil", sources=["upload", "clipboard", "webcam"], label="Image")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Conversation", height=420)
                text = gr.Textbox(placeholder="Ask about the image and press Enter", label="Question")
                audio = gr.Audio(sources=["microphone", "upload"], type="filepath", label="…or ask aloud")
                ask = gr.Button("Ask", variant="primary")

        def answer(image, text, audio, messages):
            yield from respond(assistant, image, text, audio, messages)

        for trigger in (ask.click, text.submit):
            # The question is cleared only once it was answered: after an error it stays to be fixed.
            trigger(answer, [image, text, audio, chatbot], chatbot, concurrency_limit=1).success(
                lambda: ("", None), None, [text, audio]
            )
        image.change(lambda: [], None, chatbot)  # a new image starts a new conversation
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=os.environ.get("WEIGHTS", "weights"), help="weights folder")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    args = parser.parse_args(argv)
    try:
        assistant = Assistant.from_weights(args.weights)
    except ManifestError as error:
        sys.exit(f"Cannot start: {error}.\nTrain weights (see README, training/) or pass --weights FOLDER.")
    build_demo(assistant).queue(max_size=16).launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
