"""Speech → text with openai-whisper, from a file path or a (sample_rate, samples) pair.

Whatever a visitor uploads, it costs at most what its first `max_seconds` cost: a file's duration is
read from its container header (ffprobe reads no samples), and ffmpeg decodes only the first
`max_seconds` (an input `-t`, so it stops reading there) instead of the whole file that
`whisper.load_audio` would decode, however many hours it holds.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import whisper

WHISPER_RATE = whisper.audio.SAMPLE_RATE  # 16 kHz: what whisper's mel front end expects
WINDOW_SECONDS = whisper.audio.CHUNK_LENGTH  # 30 s: whisper decodes one window at a time
# base.en: the size that `benchmarks/whisper_sizes.py` showed to transcribe a short question fast
# enough on 2 CPU threads, well ahead of small.en and more accurate than tiny.en (README, Benchmarks).
DEFAULT_WHISPER = "base.en"
MIN_SECONDS = 0.1  # shorter than this holds no word
SILENCE_PEAK = 1e-3  # peak amplitude (full scale = 1.0) below which a recording is treated as silent
FFMPEG_TIMEOUT = 60  # seconds: reading a header or 30 s of any codec takes far less; a hostile file gets no more


class AudioError(ValueError):
    """Audio that cannot be transcribed: empty, silent, undecodable, or nothing recognised."""


@dataclass(frozen=True)
class Transcript:
    text: str
    seconds: float  # duration of the audio that was transcribed
    notice: str | None = None  # e.g. that the recording was trimmed


AudioInput = str | Path | tuple[int, np.ndarray]


class Transcriber:
    def __init__(
        self,
        model: str = DEFAULT_WHISPER,
        language: str | None = "en",
        max_seconds: float = WINDOW_SECONDS,
        device: str = "cpu",
        run: Callable[[Callable[[], str]], str] | None = None,
    ) -> None:
        """`model`: a whisper size name (tiny.en, base.en, small, ...) or a path to a whisper `.pt`. `run`: how the
        model's computation is run (the app: `ServingBackend.call`, on the thread that computes every answer);
        the audio is read on the caller's thread."""
        if not 0 < max_seconds <= WINDOW_SECONDS:
            raise ValueError(f"max_seconds must be in (0, {WINDOW_SECONDS}], got {max_seconds}")
        self.model = whisper.load_model(str(model), device=device)
        if language is not None and language != "en" and not self.model.is_multilingual:
            raise ValueError(f"whisper model {model!r} is English-only; it cannot transcribe {language!r}")
        self.language = language
        self.max_seconds = max_seconds
        self.run = run or (lambda decode: decode())

    def __call__(self, audio: AudioInput) -> Transcript:
        samples, seconds = load_audio(audio, self.max_seconds)
        if seconds < MIN_SECONDS:
            raise AudioError("the recording is empty or too short to hold a question")
        notice = None
        if seconds > self.max_seconds:
            notice = f"Only the first {self.max_seconds:g} s of the {seconds:.0f} s recording were used."
        if np.abs(samples).max() < SILENCE_PEAK:
            raise AudioError("the recording is silent; check the microphone and try again")
        text = self.run(lambda: self._decode(samples))
        if not text:
            raise AudioError("no speech was recognised in the recording")
        return Transcript(text, min(seconds, self.max_seconds), notice)

    @torch.no_grad()
    def _decode(self, samples: np.ndarray) -> str:
        audio = whisper.pad_or_trim(torch.from_numpy(samples))
        mel = whisper.log_mel_spectrogram(audio, n_mels=self.model.dims.n_mels).to(self.model.device)
        options = whisper.DecodingOptions(language=self.language, fp16=False, without_timestamps=True)
        return whisper.decode(self.model, mel, options).text.strip()


def load_audio(audio: AudioInput, max_seconds: float = WINDOW_SECONDS) -> tuple[np.ndarray, float]:
    """A file path (anything ffmpeg reads) or (rate, samples) → (mono float32 at 16 kHz in [-1, 1], seconds).

    The samples are cut to `max_seconds`; the returned duration is the whole recording's.
    """
    if isinstance(audio, str | Path):
        path = Path(audio)
        if not path.is_file():
            raise AudioError(f"audio file {path.name!r} not found")
        stated = stated_seconds(path)
        # A little more than asked, so that a file whose header states no duration still shows it is longer.
        samples = decode_start(path, max_seconds + 1.0)
        seconds = stated if stated is not None else len(samples) / WHISPER_RATE
        return samples[: int(max_seconds * WHISPER_RATE)], seconds
    if not (isinstance(audio, tuple) and len(audio) == 2):
        raise AudioError(f"expected a file path or a (sample_rate, samples) pair, got {type(audio).__name__}")
    rate, samples = int(audio[0]), to_mono_float(np.asarray(audio[1]))
    if rate <= 0:
        raise AudioError(f"invalid sample rate {rate}")
    # Cut before resampling, so a long recording costs no more than the part that is used.
    return resample(samples[: int(max_seconds * rate)], rate, WHISPER_RATE), len(samples) / rate


def stated_seconds(path: Path) -> float | None:
    """The duration a file's container header states, read by ffprobe without decoding; None when it states none."""
    command = ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(path)]
    result = _run(command, path)
    try:
        seconds = float(result.stdout.strip())
    except ValueError:  # "N/A": a stream without a stated length
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def decode_start(path: Path, seconds: float) -> np.ndarray:
    """The first `seconds` of any file ffmpeg reads, as mono float32 at 16 kHz; nothing after them is decoded."""
    command = ["ffmpeg", "-nostdin", "-threads", "0", "-t", f"{seconds:.3f}", "-i", str(path)]
    command += ["-f", "s16le", "-ac", "1", "-acodec", "pcm_s16le", "-ar", str(WHISPER_RATE), "-"]
    pcm = _run(command, path, text=False).stdout
    return np.frombuffer(pcm, np.int16).astype(np.float32) / 32768.0


def _run(command: list[str], path: Path, text: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(command, capture_output=True, text=text, timeout=FFMPEG_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise AudioError(f"{path.name!r} took too long to read as audio") from None
    if result.returncode != 0:
        raise AudioError(f"{path.name!r} could not be read as audio")
    return result


def to_mono_float(samples: np.ndarray) -> np.ndarray:
    """Integer or float samples, (n,) or (n, channels) as Gradio gives them → mono float32 in [-1, 1]."""
    if samples.ndim not in (1, 2):
        raise AudioError(f"audio must be 1-D or 2-D (samples × channels), got shape {samples.shape}")
    if samples.dtype.kind == "f":
        floats = samples.astype(np.float32)
    elif samples.dtype.kind in "iu":
        info = np.iinfo(samples.dtype)
        middle = (int(info.max) + int(info.min) + 1) / 2  # 0 for signed types, 128 for uint8
        floats = ((samples.astype(np.float64) - middle) / (info.max - middle + 1)).astype(np.float32)
    else:
        raise AudioError(f"unsupported sample type {samples.dtype}")
    if floats.ndim == 2:
        channel_axis = 1 if floats.shape[1] <= floats.shape[0] else 0  # channels are the short side
        floats = floats.mean(axis=channel_axis)
    return floats


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling through the FFT (an ideal low-pass), for clips up to a few minutes."""
    if rate == target or samples.size == 0:
        return samples.astype(np.float32)
    length = round(len(samples) * target / rate)
    spectrum = np.fft.rfft(samples.astype(np.float64))
    bins = length // 2 + 1
    spectrum = spectrum[:bins] if bins <= len(spectrum) else np.pad(spectrum, (0, bins - len(spectrum)))
    return (np.fft.irfft(spectrum, n=length) * (length / len(samples))).astype(np.float32)
