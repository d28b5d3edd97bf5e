"""The offline test kit: images, speech, a served app, killed runs and reference decoding.

The tiny random models themselves (phi, CLIP, whisper, GPT-2's tokenizer, weights folders) are built
by `inference.tiny`, which `app.py --demo` uses too; the tokenizer trained in place and the tiny Phi
that knows some text by `training.shapes`, which the tiny training recipe uses too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from inference.config import GenerationOptions, TemplateName
from inference.dimensions import PHI2
from inference.prompt import Conversation, Turn, render
from inference.vision import preprocess
from training.checkpoint import CRASH_AT
from training.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


def with_phi2_dropout(source: Path, folder: Path) -> Path:
    """A copy of a tiny Phi that trains with phi-2's own dropout (resid_pdrop 0.1) instead of none."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "resid_pdrop": PHI2.resid_pdrop}))
    return folder


def run_killed(command: list[str], crash_at: str = "", kill_after: float | None = None, timeout: float = 300) -> int:
    """Run a training command in a subprocess; SIGKILL it at a named point (`CRASH_AT`) or after a delay.

    Returns its exit status: -SIGKILL when it was killed, 0 when it finished first.
    """
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", CRASH_AT: crash_at}
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if kill_after is not None:
            try:
                process.wait(kill_after)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=timeout)
    finally:
        process.kill()
    if process.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{' '.join(command)} failed:\n{stderr.decode()[-3000:]}")
    return process.returncode


def make_shape_image(colour: str = "red", size: tuple[int, int] = (96, 64), mode: str = "RGB") -> Image.Image:
    """A coloured ellipse on a grey background, converted to `mode`."""
    image = Image.new("RGB", size, (128, 128, 128))
    ImageDraw.Draw(image).ellipse((size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4), fill=colour)
    return image.convert(mode)


@contextmanager
def killed_at_step(step: int) -> Iterator[None]:
    """Make a training run die (KeyboardInterrupt) as optimizer step `step` (1-based) begins, like a kill."""
    real_step, calls = Trainer.train_step, []

    def crash(self, micro_batches):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt(f"killed at step {step}")
        return real_step(self, micro_batches)

    Trainer.train_step = crash
    try:
        yield
    finally:
        Trainer.train_step = real_step


def speak(text: str, path: Path) -> Path:
    """Speech made with espeak-ng (an apt package that the test command installs)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed: run the README's test command, which installs it")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving_app(args: list[str], log_path: Path, timeout: float = 180.0, env: dict | None = None) -> Iterator[str]:
    """Run `python app.py ARGS` offline in a subprocess (`env`: more environment); yield its URL once it answers,
    stop it after.

    Its HF_HOME is a folder beside the log, so what the app saves at start (the int8 model, a GGUF export)
    stays out of the user's cache."""
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    env["HF_HOME"] = str(log_path.parent / "hf-home")
    command = [sys.executable, str(REPO / "app.py"), *args, "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"app.py exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"app.py did not answer in {timeout:.0f} s") from None
                    time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@torch.no_grad()
def greedy_without_cache(model, input_ids: list[int], image_embeds, max_new_tokens: int) -> list[int]:
    """The original project's decoding: a full forward over the whole sequence for every new token.

    The reference that the KV-cached `MultimodalPhi.generate` is held against.
    """
    embeds = model.build_inputs([input_ids], image_embeds).inputs_embeds
    embed_tokens = model.language_model.get_input_embeddings()
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.language_model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
        token = int(logits.argmax())
        tokens.append(token)
        if token == model.eos_token_id:
            break
        embeds = torch.cat([embeds, embed_tokens(torch.tensor([[token]], device=model.device))], dim=1)
    return tokens


def pixels(model, *images: Image.Image) -> torch.Tensor:
    """Images → the model's vision tower input (as the assistant and the collator make it)."""
    return preprocess(list(images), model.vision_tower.image_size)


def prompt_ids(tokenizer, question: str = "What is in this picture?", image_tokens: int = 49) -> list[int]:
    """The phi-2 chat prompt for one question about an image of `image_tokens` patches."""
    conversation = Conversation((Turn(question),))
    return render(TemplateName.PHI2_CHAT, conversation, tokenizer, True, image_tokens=image_tokens).input_ids


# Continuous batching: what is asked while the batcher is held is decoded together (any backend with a `Batcher`).
QUESTIONS = ("What colour is it?", "Where is the shape in the picture, and how large is it?", "Round?", "Why?")
COLOURS = ("red", "blue", "green", "yellow")


def held(backend) -> threading.Event:
    """Keep the batcher busy until the returned event is set, so that what is asked meanwhile waits together."""
    release, started = threading.Event(), threading.Event()
    threading.Thread(target=backend.batcher.call, args=(lambda: (started.set(), release.wait()),), daemon=True).start()
    started.wait()
    return release


def queued(backend, count: int) -> None:
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


def batch_sizes(backend) -> list[int]:
    """The number of rows of every decode step `backend` takes from now on."""
    sizes, step = [], backend.batcher._step
    backend.batcher._step = lambda: (sizes.append(len(backend.batcher.running)), step())[1]
    return sizes


def four_requests(loaded) -> list[tuple[list[int], torch.Tensor, GenerationOptions]]:
    """Four questions about four images; different prompt lengths and answer lengths, so rows join and leave at
    different steps."""
    model, requests = loaded.model, []
    for index, (question, colour) in enumerate(zip(QUESTIONS, COLOURS, strict=True)):
        embeds = model.encode_images(pixels(model, make_shape_image(colour)))
        ids = prompt_ids(loaded.tokenizer, question, loaded.manifest.image_tokens)
        requests.append((ids, embeds, GenerationOptions(8 + 4 * index)))
    return requests
