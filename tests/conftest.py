"""Session fixtures: tiny models and data built once per test run in temporary folders, never downloaded."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub or gradio: no test may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from pathlib import Path

import pytest
import torch

from inference import tiny
from inference.assistant import Assistant
from inference.backends.pytorch import TorchBackend
from inference.loading import load_weights
from inference.speech import Transcriber
from tests import kit
from training.shapes import build_bpe_tokenizer

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return build_bpe_tokenizer()


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return tiny.build_gpt2_tokenizer()


@pytest.fixture(scope="session")
def phi_dir(artifacts, bpe_tokenizer) -> Path:
    return tiny.build_tiny_phi(artifacts / "tiny-phi", bpe_tokenizer)


@pytest.fixture(scope="session")
def gpt2_phi_dir(artifacts, gpt2_tokenizer) -> Path:
    """A tiny Phi over GPT-2's genuine vocabulary, for tests where real token ids matter."""
    return tiny.build_tiny_phi(artifacts / "tiny-phi-gpt2", gpt2_tokenizer)


@pytest.fixture(scope="session")
def clip_dir(artifacts) -> Path:
    return tiny.build_tiny_clip(artifacts / "tiny-clip")


@pytest.fixture(scope="session")
def whisper_path(artifacts) -> Path:
    return tiny.build_tiny_whisper(artifacts / "tiny-whisper.pt")


@pytest.fixture(scope="session")
def weights_dir(artifacts, phi_dir, clip_dir) -> Path:
    """A complete weights folder: manifest, mlp2x_gelu projector and a random LoRA adapter."""
    return tiny.build_weights_folder(artifacts / "weights", phi_dir, clip_dir)


@pytest.fixture(scope="session")
def speech_wav(artifacts) -> Path:
    return kit.speak("What is in this picture?", artifacts / "question.wav")


@pytest.fixture(scope="session")
def transcriber(whisper_path) -> Transcriber:
    return Transcriber(str(whisper_path))


@pytest.fixture
def loaded(weights_dir):
    """The tiny weights folder loaded in fp32, so comparisons are exact."""
    return load_weights(weights_dir, dtype=torch.float32)


@pytest.fixture
def assistant(loaded, transcriber) -> Assistant:
    return Assistant(TorchBackend(loaded.model), loaded.tokenizer, loaded.manifest, transcriber)
