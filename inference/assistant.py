"""Assistant: one call that takes the history, an image, typed or spoken text, and streams the answer.

The assistant talks, the model computes: the assistant turns the question into a prompt, the image into
pixels (once per conversation), and the generated tokens into growing text on a generation thread.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from inference.backends import Backend, ServingBackend, load_backend
from inference.config import PHI2_ID, TINYCLIP_ID, GenerationOptions, Manifest
from inference.hub import parse_reference
from inference.loading import resolve_model_reference
from inference.model import shared_prefix
from inference.precision import DEFAULT_PRECISION, Precision
from inference.prompt import IMAGE_PLACEHOLDER_ID, Conversation, Turn, render
from inference.serving_cache import SERVING_CACHE
from inference.speech import DEFAULT_WHISPER, AudioError, AudioInput, Transcriber, Transcript
from inference.vision import ImageError, image_key, load_image, pixel_values, to_rgb

MAX_QUESTION_CHARS = 2000  # longer questions are refused before tokenising
IMAGE_CACHE_SIZE = 8  # image embeddings kept, so each conversation's image is encoded once
# What `Assistant.load` serves when given no weights: what training writes for the Space, once it is there.
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


class InputError(ValueError):
    """A problem with what the user gave; the message is written for them."""


@dataclass(frozen=True)
class Reply:
    question: str  # what was asked: the typed text and/or the transcript of the audio
    answer: str  # the answer so far; grows with each reply yielded
    transcript: str | None = None  # what whisper heard, when audio was given
    notice: str | None = None  # something the user should know (audio trimmed, history shortened)


class Assistant:
    def __init__(
        self, backend: ServingBackend, tokenizer, manifest: Manifest, transcriber: Transcriber | None = None
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.transcriber = transcriber
        self._image_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        weights: str | Path | None = None,
        *,
        demo: bool = False,
        whisper_model: str | None = DEFAULT_WHISPER,
        backend: Backend | str = Backend.TORCH,
        precision: Precision | str = DEFAULT_PRECISION,
        gguf: str | Path | None = None,
        cache: Path = SERVING_CACHE,
        threads: int | None = None,
        slots: int | None = None,
    ) -> Assistant:
        """What the app serves, for any caller: the weights folder or Hub id in `weights`; without one,
        `DEFAULT_WEIGHTS` once trained, else the original project's checkpoint (imported once); with `demo`,
        tiny random models built here. Whisper `whisper_model` transcribes speech (None: typed questions
        only). `backend`, `precision`, `gguf` and `cache` choose how the language model runs
        (`inference.backends.load_backend`). Threads: `threads`, else the CPU quota of this container
        (`inference.threads`), set before loading, since int8 quantizes at load with the same pool.
        """
        from inference.threads import set_threads

        if threads is None:
            threads = set_threads()
        else:
            torch.set_num_threads(threads)
        if demo:
            from inference.tiny import build_demo_weights

            folder = Path(tempfile.mkdtemp(prefix="vqa-demo-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)  # built for this run only
            weights, whisper_path = build_demo_weights(folder)
            whisper_model, cache = str(whisper_path), folder / "cache"
        loaded = load_backend(choose_weights(weights), backend, precision, gguf, threads, cache, slots)
        transcriber = None
        if whisper_model is not None:  # loaded, and later run, where the backend computes (`inference.batching`)
            transcriber = loaded.backend.call(lambda: Transcriber(whisper_model, run=loaded.backend.call))
        assistant = cls(loaded.backend, loaded.tokenizer, loaded.manifest, transcriber)
        assistant.warm()
        return assistant

    def warm(self) -> None:
        """Before the first question: the KV cache of the text every prompt starts with (`ServingBackend.prepare`)
        and one image through the vision tower, so no visitor pays for them or for the kernels' first calls."""
        prefix = self._question_prefix(image=False)
        if prefix:
            self.backend.prepare(prefix)
        blank = Image.new("RGB", (self.backend.image_size, self.backend.image_size))
        self.backend.encode_images(pixel_values([blank], self.backend.image_size))

    def look(self, image: Image.Image | str | Path) -> None:
        """Read `image` before its first question comes (the app calls this when it is uploaded): its
        embeddings, and the KV cache of a first question's prompt up to the question (system prompt, template,
        image), so that the question computes only its own positions. An image that cannot be used is left
        for `chat` to refuse."""
        try:
            key, image_embeds = self._encode(image)
        except InputError:
            return
        prefix = self._question_prefix(image=True)
        if IMAGE_PLACEHOLDER_ID in prefix:  # templates put the image before the question
            self.backend.prepare(prefix, image_embeds, key)

    def _question_prefix(self, image: bool) -> list[int]:
        """What every first question's prompt starts with: up to the image (`image` False) or through it."""
        prompts = [self._prompt([], question, GenerationOptions(max_new_tokens=1))[0] for question in ("A?", "B?")]
        keys = ("same", "same") if image else (object(), object())  # different images end the prefix there
        return prompts[0][: shared_prefix(prompts[0], keys[0], prompts[1], keys[1])]

    @property
    def max_positions(self) -> int:
        return self.backend.max_positions

    def chat(
        self,
        history: Sequence[tuple[str, str]],
        image: Image.Image | str | Path | None,
        text: str | None = None,
        audio: AudioInput | None = None,
        options: GenerationOptions | None = None,
    ) -> Iterator[Reply]:
        """Answer a question about `image` (PIL image or file path), given earlier (question, answer) pairs.

        Yields a `Reply` whose `answer` grows as tokens arrive. Raises `InputError` for anything the user
        can fix (no image, no question, unreadable audio or image, too long a question).
        """
        options = options or self.manifest.generation  # the weights' own defaults
        if image is None:
            raise InputError("Upload an image first, then ask about it.")
        transcript = self._transcribe(audio) if audio is not None else None
        parts = [(text or "").strip(), transcript.text if transcript else ""]
        question = " ".join(part for part in parts if part)
        if not question:
            raise InputError("Type or record a question about the image.")
        if len(question) > MAX_QUESTION_CHARS:
            raise InputError(f"The question is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}.")

        image_key, image_embeds = self._encode(image)
        input_ids, dropped = self._prompt(history, question, options)
        notices = [transcript.notice if transcript else None]
        if dropped:
            notices.append(f"The {dropped} oldest exchange(s) no longer fit the context and were left out.")
        notice = " ".join(n for n in notices if n) or None
        heard = transcript.text if transcript else None
        yield Reply(question, "", heard, notice)
        for answer in self._stream(input_ids, image_embeds, image_key, options):
            yield Reply(question, answer, heard, notice)

    def _stream(
        self, input_ids: list[int], image_embeds: torch.Tensor, image_key: str, options: GenerationOptions
    ) -> Iterator[str]:
        """Yield the growing answer text as the model generates on a thread. Closing the iterator stops it."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.backend.generate(input_ids, image_embeds, options, streamer, stop, image_key)
            except BaseException as error:
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=run, name="generate", daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                if piece and text.strip():
                    # The first token carries the space after "ASSISTANT:"; the answer is the text after it.
                    yield text.lstrip()
        finally:
            stop.set()
            thread.join()
        if errors:
            raise errors[0]

    def _encode(self, image: Image.Image | str | Path) -> tuple[str, torch.Tensor]:
        """(a key naming the image's pixels, its projected embeddings), from the cache when seen before."""
        try:
            image = to_rgb(image if isinstance(image, Image.Image) else load_image(image))
        except ImageError as error:
            raise InputError(f"The image could not be used: {error}.") from error
        key = image_key(image)
        with self._lock:
            if key in self._image_cache:
                self._image_cache.move_to_end(key)
                return key, self._image_cache[key]
        embeds = self.backend.encode_images(pixel_values([image], self.backend.image_size))
        with self._lock:
            self._image_cache[key] = embeds
            while len(self._image_cache) > IMAGE_CACHE_SIZE:
                self._image_cache.popitem(last=False)
        return key, embeds

    def _transcribe(self, audio: AudioInput) -> Transcript:
        if self.transcriber is None:
            raise InputError("Spoken questions are turned off here; type the question instead.")
        try:
            return self.transcriber(audio)
        except AudioError as error:
            raise InputError(f"The audio could not be used: {error}.") from error

    def _prompt(
        self, history: Sequence[tuple[str, str]], question: str, options: GenerationOptions
    ) -> tuple[list[int], int]:
        """Prompt ids for the newest question, dropping the oldest exchanges until the answer fits."""
        if not self.manifest.template.multi_turn:
            history = []  # caption-only (stage 1) and the original project's weights answer every question afresh
        budget = self.max_positions - options.max_new_tokens
        for dropped in range(len(history) + 1):
            # Answers as training renders them: the template puts the one space after "ASSISTANT:" itself.
            turns = [Turn(q.strip(), a.strip()) for q, a in history[dropped:]] + [Turn(question)]
            conversation = Conversation(tuple(turns))
            prompt = render(
                self.manifest.template, conversation, self.tokenizer, True, image_tokens=self.manifest.image_tokens
            )
            if len(prompt.input_ids) <= budget:
                return prompt.input_ids, dropped
        raise InputError(
            f"The question is too long: with a {options.max_new_tokens}-token answer it does not fit the "
            f"model's {self.max_positions}-token context. Shorten it or lower the answer length."
        )


def choose_weights(reference: str | Path | None) -> str | Path:
    """What to serve: the given folder or Hub id; else `DEFAULT_WEIGHTS` once trained; else the original checkpoint."""
    if reference:
        return reference
    if (DEFAULT_WEIGHTS / "manifest.json").is_file():
        return DEFAULT_WEIGHTS
    from inference.original import original_weights

    print("weights/ holds no trained weights: serving the original project's checkpoint", flush=True)
    return original_weights()


def start_references(weights: str | Path | None = None) -> list[str]:
    """The Hub repos `Assistant.load(weights)` reads at start, found without downloading: a weights repo
    given by id, and the base models a local weights folder's manifest names (`DEFAULT_WEIGHTS` once
    trained); without trained weights, the original checkpoint's Space and the base models it is imported
    over. A Space lists these in its README's `preload_from_hub`, so that it wakes without downloading."""
    from inference.original import ORIGINAL_SPACE

    if not weights and (DEFAULT_WEIGHTS / "manifest.json").is_file():
        weights = DEFAULT_WEIGHTS
    if not weights:
        return [ORIGINAL_SPACE, PHI2_ID, TINYCLIP_ID]  # the base models import_original puts it over
    if not Path(weights).is_dir():
        return [str(weights)]  # its manifest is in the repo: its base models are known once it is downloaded
    folder, manifest = Path(weights), Manifest.load(Path(weights))
    references = [resolve_model_reference(folder, name) for name in (manifest.language_model, manifest.vision_model)]
    return [reference for reference in references if parse_reference(reference) and not Path(reference).exists()]
