"""Gradio Space: upload an image, ask about it by typing or speaking, and watch phi-2 answer.

    python app.py                      # weights/ if trained, else the original project's checkpoint
    python app.py --weights DIR_OR_ID  # a weights folder, or a Hub repo id (OWNER/NAME[@REVISION])
    python app.py --demo               # tiny random models built offline: try the UI anywhere
    python app.py --backend llama.cpp  # the language model in llama.cpp (Q8_0) instead of PyTorch int8

Every option can also come from the environment, as a Space sets it: WEIGHTS, WHISPER, BACKEND, GGUF,
PRECISION, SLOTS, QUEUE_SIZE, DEMO=1, SHARE=1, and Gradio's own GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.
`demo` is importable (built on first access from those settings); the layout and events are all this
file holds: the work is done by one `inference.Assistant`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
from PIL import Image

from inference import Assistant, GenerationOptions, InputError
from inference.backends import Backend
from inference.backends.pytorch import SLOTS
from inference.cli import ArgumentParser, UsageError, command
from inference.config import ManifestError
from inference.precision import DEFAULT_PRECISION, Precision
from inference.speech import DEFAULT_WHISPER, WINDOW_SECONDS
from inference.vision import ImageError, image_key, load_image, to_rgb

EXAMPLES_DIR = Path(__file__).parent / "inference" / "examples"
EXAMPLES = [
    [str(EXAMPLES_DIR / "grace_hopper.jpg"), "Describe this photo. What is the person wearing?"],
    [str(EXAMPLES_DIR / "shapes.png"), "What colour is the circle, and where is it?"],
]
# Requests waiting beyond those being answered (env QUEUE_SIZE); more are turned away with a message.
QUEUE_SIZE = int(os.environ.get("QUEUE_SIZE", 16))
MAX_UPLOAD = "25mb"  # larger uploads are refused by Gradio before they reach the model
DEMO_BANNER = (
    "**Demo mode:** these are tiny *random* models built on this machine, so the answers and transcripts "
    "are meaningless. They show the interface working; start without `--demo` to serve trained weights."
)
# Uploads are deleted once this old (seconds; env UPLOAD_LIFETIME): a conversation can go on, or an answer
# be retried, for that long after its image was uploaded. Spoken questions are deleted once answered.
UPLOAD_LIFETIME = int(os.environ.get("UPLOAD_LIFETIME", 6 * 3600))
# A recording stops by itself after this long (seconds; env MAX_RECORDING): whisper hears only the first
# 30 s anyway. (The pinned Gradio's Audio has no length limit of its own, so the page stops it.)
MAX_RECORDING = float(os.environ.get("MAX_RECORDING", WINDOW_SECONDS))
STOP_RECORDING_JS = "() => setTimeout(() => document.querySelector('#audio button.stop-button')?.click(), {ms})"


@dataclass(frozen=True)
class Exchange:
    question: str
    answer: str
    image: str  # which image it was about: its pixels' key (inference.vision.image_key)
    spoken: bool = False  # the question came from the microphone or an audio file


def open_upload(image: str | None) -> tuple[Image.Image | str | None, str]:
    """The uploaded image decoded once (upright RGB) and its key by pixels, as the assistant's caches name it,
    so the same picture uploaded again continues the chat; a missing or unreadable upload stays as it came,
    with key "" (the assistant then says why)."""
    if image is None or not Path(image).is_file():
        return image, ""
    try:
        picture = to_rgb(load_image(image))
    except ImageError:
        return image, ""
    return picture, image_key(picture)


def upload_key(image: str | None) -> str:
    return open_upload(image)[1]


def read_upload(assistant: Assistant, image: str | None) -> None:
    """Start on an uploaded image while its visitor types or speaks (`Assistant.look`); a bad upload is left
    for the question to report."""
    picture, key = open_upload(image)
    if key:
        assistant.look(picture)


def same_conversation(exchanges: list[Exchange], key: str) -> list[Exchange]:
    """The exchanges about the image `key`: a new image starts a new conversation, whatever the events' order."""
    return exchanges if exchanges and exchanges[-1].image == key else []


def to_messages(exchanges: list[Exchange]) -> list[dict[str, str]]:
    """The conversation as Gradio chat messages; a spoken question shows what whisper heard."""
    messages = []
    for exchange in exchanges:
        question = f"🎤 {exchange.question}" if exchange.spoken else exchange.question
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": exchange.answer}]
    return messages


def respond(
    assistant: Assistant,
    image: str | None,
    text: str | None,
    audio: str | None,
    exchanges: list[Exchange],
    options: GenerationOptions | None = None,
) -> Iterator[tuple[list[dict[str, str]], list[Exchange]]]:
    """Stream (chat messages, conversation) as the answer grows; a user's mistake becomes a readable error."""
    picture, key = open_upload(image)
    exchanges = same_conversation(exchanges, key)
    history = [(exchange.question, exchange.answer) for exchange in exchanges]
    try:
        for reply in assistant.chat(history, picture, text=text, audio=audio, options=options):
            if reply.notice and not reply.answer:
                gr.Warning(reply.notice)
            spoken = reply.transcript is not None
            current = [*exchanges, Exchange(reply.question, reply.answer, key, spoken)]
            yield to_messages(current), current
    except InputError as error:
        raise gr.Error(str(error), print_exception=False) from None


def generation_options(
    defaults: GenerationOptions, max_new_tokens: float, temperature: float, top_p: float
) -> GenerationOptions:
    """The weights' defaults with the settings a user chose."""
    try:
        chosen = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))
        return replace(defaults, **chosen)
    except (TypeError, ValueError) as error:
        raise gr.Error(f"Invalid setting: {error}", print_exception=False) from None


def hand_over_unopened(image: gr.Image) -> gr.Image:
    """Make `image` pass an upload's path on unopened, so the assistant reads it.

    Gradio's own preprocessing opens the file with PIL, and an unreadable or oversized upload would end
    in a bare "Error"; `inference.vision.load_image` refuses it with a message the user can act on.
    Gradio has already checked that the path is an upload of this app's. (An override on the instance,
    not a subclass: Gradio writes a `.pyi` file beside the source of every component subclass.)
    """
    decode = image.preprocess

    def preprocess(payload):
        if payload is None or (payload.url or "").startswith("data:"):
            return decode(payload)  # pasted or webcam data: Gradio writes it to a file
        return payload.path

    image.preprocess = preprocess
    return image


def header(assistant: Assistant, demo_mode: bool) -> str:
    manifest = assistant.manifest
    lines = [
        "## Ask about an image",
        f"Upload an image, then type or record a question. Weights **{manifest.name}**: "
        f"`{manifest.vision_model}` → {manifest.projector.type.value} projector → `{manifest.language_model}`"
        + (" + LoRA (merged)" if manifest.adapter else "")
        + f", {assistant.backend.describe()} on the CPU",
    ]
    if demo_mode:
        lines.append(f"> {DEMO_BANNER}")
    return "\n\n".join(lines)


def remove_upload(path: str | None) -> None:
    """Delete a file Gradio received for this app (and only such a file) once nothing needs it."""
    if path and Path(path).resolve().is_relative_to(Path(gr.utils.get_upload_folder()).resolve()):
        Path(path).unlink(missing_ok=True)


def build_demo(assistant: Assistant, demo_mode: bool = False) -> gr.Blocks:
    defaults = assistant.manifest.generation  # the weights' own answer length and sampling
    sweep = max(1, min(UPLOAD_LIFETIME, 600))  # how often old uploads are looked for
    with gr.Blocks(title="Ask about an image", delete_cache=(sweep, UPLOAD_LIFETIME)) as demo:
        gr.Markdown(header(assistant, demo_mode), elem_id="header")
        exchanges = gr.State([])
        text = gr.Textbox(  # rendered in the chat column; made first so the examples can fill it in
            placeholder="Ask about the image and press Enter", label="Question", elem_id="question", render=False
        )
        with gr.Row():
            with gr.Column(scale=2):
                image = hand_over_unopened(
                    gr.Image(type="filepath", sources=["upload", "clipboard", "webcam"], label="Image", elem_id="image")
                )
                gr.Examples(EXAMPLES, inputs=[image, text], label="Examples (click one)", elem_id="examples")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", height=440, elem_id="chat")
                text.render()
                audio = gr.Audio(
                    sources=["microphone", "upload"],
                    type="filepath",
                    format=None,  # no conversion by Gradio: ffmpeg reads it, and refusals are readable
                    label="…or ask aloud (record, or upload an audio file)",
                    elem_id="audio",
                )
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    retry = gr.Button("Retry last answer", elem_id="retry")
                    clear = gr.Button("Clear", elem_id="clear")
                with gr.Accordion("Settings", open=False):
                    max_new_tokens = gr.Slider(8, 1024, defaults.max_new_tokens, step=1, label="Max new tokens")
                    temperature = gr.Slider(
                        0.0, 1.5, defaults.temperature, step=0.05, label="Temperature (0 = greedy, repeatable)"
                    )
                    top_p = gr.Slider(0.05, 1.0, defaults.top_p, step=0.05, label="Top-p (when sampling)")
        settings = [max_new_tokens, temperature, top_p]

        def answer(image, text, audio, exchanges, *settings):
            yield from respond(assistant, image, text, audio, exchanges, generation_options(defaults, *settings))
            remove_upload(audio)  # answered: the question is in the chat as text, the recording is not needed

        def answer_again(image, exchanges, *settings):
            exchanges = same_conversation(exchanges, upload_key(image))
            if not exchanges:
                raise gr.Error("There is no answer to retry yet.", print_exception=False)
            last = exchanges[-1]
            options = generation_options(defaults, *settings)
            yield from respond(assistant, image, last.question, None, exchanges[:-1], options)

        # As many answers at once as the backend decodes together (`--slots`), whichever button started them;
        # the queue shows the rest their place.
        slots = assistant.backend.slots
        running = dict(concurrency_limit=slots, concurrency_id="generate", show_progress="minimal")
        private = dict(api_visibility="private", queue=False)
        asked = gr.on(
            [ask.click, text.submit],
            answer,
            [image, text, audio, exchanges, *settings],
            [chatbot, exchanges],
            api_name="ask",
            **running,
        )
        asked.success(lambda: ("", None), None, [text, audio], **private)  # after an error the question stays
        retried = retry.click(
            answer_again, [image, exchanges, *settings], [chatbot, exchanges], api_name="retry", **running
        )
        generating = [asked, retried]
        stop.click(None, None, None, cancels=generating)
        audio.start_recording(None, None, None, js=STOP_RECORDING_JS.format(ms=round(MAX_RECORDING * 1000)))
        clear.click(
            lambda: ([], [], "", None), None, [chatbot, exchanges, text, audio], cancels=generating, api_name="clear"
        )
        # A new image starts a new conversation: shown at once here, and enforced by `respond` even when
        # this event arrives after a question asked during the upload.
        image.change(lambda: ([], []), None, [chatbot, exchanges], **private)
        # Read a new image while its question is typed or spoken, in the generation group: the question only
        # computes its own positions (the backend runs it between two decode steps).
        image.change(
            lambda image: read_upload(assistant, image),
            [image],
            None,
            concurrency_limit=slots,
            concurrency_id="generate",
            show_progress="hidden",
            api_visibility="private",
        )
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = ArgumentParser(description=__doc__)
    parser.add_argument(
        "--weights",
        default=env("WEIGHTS"),
        help="weights folder or Hub repo id (env WEIGHTS); default: weights/ when it holds a manifest, "
        "else the original project's checkpoint, downloaded and converted once",
    )
    parser.add_argument(
        "--whisper", default=env("WHISPER", DEFAULT_WHISPER), help="whisper size or .pt path (env WHISPER)"
    )
    parser.add_argument(
        "--backend",
        choices=[backend.value for backend in Backend],
        default=env("BACKEND", Backend.TORCH.value),
        help="where the language model runs (env BACKEND): torch (in --precision; int8, the fastest faithful "
        "one in benchmarks/cpu_inference.py) or llama.cpp (Q8_0)",
    )
    parser.add_argument(
        "--gguf",
        default=env("GGUF"),
        help="llama.cpp backend: folder or Hub repo id with the language-model-*.gguf that training.export_gguf "
        "wrote for these weights (env GGUF); default: exported from the weights at the first start",
    )
    parser.add_argument(
        "--precision",
        choices=[precision.value for precision in Precision],
        default=env("PRECISION", DEFAULT_PRECISION.value),
        help="torch backend: language model precision on the CPU (env PRECISION)",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=int(env("SLOTS", SLOTS)),
        help="torch backend: visitors answered at once, their answers decoded together (env SLOTS); the rest queue",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        default=env("DEMO", "") not in ("", "0"),
        help="serve tiny random models built offline; answers are meaningless (env DEMO=1)",
    )
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"), help="env GRADIO_SERVER_NAME")
    parser.add_argument(
        "--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")), help="env GRADIO_SERVER_PORT"
    )
    parser.add_argument(
        "--share",
        action="store_true",
        default=env("SHARE", "") not in ("", "0"),
        help="create a public gradio.live link (off by default; env SHARE=1)",
    )
    return parser.parse_args(argv)


def load_assistant(args: argparse.Namespace) -> Assistant:
    """The assistant the arguments ask for; exits with what to do when there are no usable weights."""
    started = time.perf_counter()
    try:
        assistant = Assistant.load(
            args.weights,
            demo=args.demo,
            whisper_model=args.whisper,
            backend=args.backend,
            precision=args.precision,
            gguf=args.gguf,
            slots=args.slots,
        )
    except ManifestError as error:
        raise UsageError(
            f"cannot start: {error}. Train weights (README, training/) into weights/, pass --weights with a "
            "folder or Hub repo id, or run with --demo to try the interface on tiny random models"
        ) from None
    took = time.perf_counter() - started
    print(f"Loaded {assistant.manifest.name} ({assistant.backend.describe()}) in {took:.1f} s", flush=True)
    return assistant


def build_app(args: argparse.Namespace) -> gr.Blocks:
    demo = build_demo(load_assistant(args), demo_mode=args.demo)
    return demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)


def __getattr__(name: str) -> gr.Blocks:
    """`from app import demo` (or `gradio app.py`) builds the app from the environment on first access."""
    if name != "demo":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()["demo"] = demo = build_app(parse_args([]))
    return demo


@command
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    demo = build_app(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stopped server still cleans up (atexit)
    demo.launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD, show_error=False
    )


if __name__ == "__main__":
    main()
