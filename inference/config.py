"""Typed configuration: the weights manifest that rebuilds a model, and generation options.

The manifest (`manifest.json` in a weights folder) is the only thing loading reads to decide how to
build the model; nothing is guessed from folder or repo names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from inference.cli import UsageError
from inference.dimensions import PHI2, TINYCLIP_61M

PHI2_ID = "microsoft/phi-2"
TINYCLIP_ID = "wkcn/TinyCLIP-ViT-61M-32-Text-29M-LAION400M"
TINYCLIP_WIDTH = TINYCLIP_61M.hidden_size  # width of one vision patch feature
PHI2_WIDTH = PHI2.hidden_size  # phi-2's embedding width
TINYCLIP_PATCH_TOKENS = TINYCLIP_61M.num_patches  # (224 px / 32 px patches)² = 7 × 7

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1  # bump when a field changes meaning; loading refuses formats it does not know


class ManifestError(UsageError):
    """A manifest that is missing, malformed or inconsistent."""


class ProjectorType(StrEnum):
    LINEAR = "linear"  # one Linear(vision → text): the original project's projector
    MLP2X_GELU = "mlp2x_gelu"  # Linear → GELU → Linear: LLaVA-1.5's projector


class TemplateName(StrEnum):
    PHI2_CHAT = "phi2_chat"  # system line + USER/ASSISTANT turns: instruction tuning and serving
    PLAIN = "plain"  # image then caption: stage-1 alignment
    ORIGINAL = "original"  # the original project's input: image, the token "comment", the question; no history

    @property
    def multi_turn(self) -> bool:
        """Whether earlier exchanges are part of the prompt (the others answer every question afresh)."""
        return self is TemplateName.PHI2_CHAT


@dataclass(frozen=True)
class ProjectorConfig:
    type: ProjectorType = ProjectorType.MLP2X_GELU
    in_features: int = TINYCLIP_WIDTH  # width of one vision patch feature
    out_features: int = PHI2_WIDTH  # width of the language model's token embeddings

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", _enum(ProjectorType, self.type, "projector.type"))
        for name in ("in_features", "out_features"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ManifestError(f"projector.{name} must be a positive integer, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class GenerationOptions:
    """How an answer is generated. Greedy unless `temperature` is above zero."""

    max_new_tokens: int = 256  # answer length limit, in tokens
    temperature: float = 0.0  # 0 = greedy (deterministic); above 0 samples from softmax(logits / T)
    top_p: float = 1.0  # nucleus sampling mass, used only when sampling
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages repeating tokens

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 2048:
            raise ValueError(f"max_new_tokens must be an integer in [1, 2048], got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"temperature must be in [0, 5], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 1.0 <= self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in [1, 2], got {self.repetition_penalty!r}")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0.0

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers `generate()`."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


@dataclass(frozen=True)
class Manifest:
    """Everything needed to rebuild the served model from a weights folder."""

    name: str = "multimodal-phi2"  # shown in the app's header
    # Hub id or folder of the causal LM (and its tokenizer); "./x" is relative to the weights folder.
    language_model: str = PHI2_ID
    vision_model: str = TINYCLIP_ID  # Hub id or folder of a transformers CLIP vision model (same rule)
    # Which hidden state of the vision transformer feeds the projector: -1 is the last layer (the
    # original project), -2 the penultimate (LLaVA). Training chooses; the manifest records it.
    vision_feature_layer: int = -2
    image_tokens: int = TINYCLIP_PATCH_TOKENS  # patch tokens per image (CLS dropped); checked at load
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    template: TemplateName = TemplateName.PHI2_CHAT
    adapter: bool = False  # True when the folder holds a peft LoRA adapter in adapter/
    # How these weights answer by default (the app's settings start here; a user can change them).
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    training: dict[str, Any] = field(default_factory=dict)  # the run that produced these weights
    format: int = MANIFEST_FORMAT

    def __post_init__(self) -> None:
        if isinstance(self.projector, dict):
            object.__setattr__(self, "projector", _from_dict(ProjectorConfig, self.projector, "projector"))
        object.__setattr__(self, "template", _enum(TemplateName, self.template, "template"))
        if isinstance(self.generation, dict):
            try:
                object.__setattr__(self, "generation", _from_dict(GenerationOptions, self.generation, "generation"))
            except ValueError as error:  # a value out of range
                raise ManifestError(f"manifest generation settings: {error}") from None
        if self.format != MANIFEST_FORMAT:
            raise ManifestError(f"manifest format {self.format} is not supported (this code reads {MANIFEST_FORMAT})")
        for name in ("name", "language_model", "vision_model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ManifestError(f"manifest field {name!r} must be a non-empty string")
        if not isinstance(self.image_tokens, int) or self.image_tokens <= 0:
            raise ManifestError(f"image_tokens must be a positive integer, got {self.image_tokens!r}")
        if not isinstance(self.vision_feature_layer, int):
            raise ManifestError(f"vision_feature_layer must be an integer, got {self.vision_feature_layer!r}")
        if not isinstance(self.adapter, bool):
            raise ManifestError(f"adapter must be true or false, got {self.adapter!r}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return _from_dict(cls, data, "manifest")

    def save(self, folder: str | Path) -> Path:
        """Write `manifest.json` into `folder` atomically (temp file, then rename)."""
        path = Path(folder) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{path} not found: a weights folder needs a {MANIFEST_NAME}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ManifestError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise ManifestError(f"{path} must hold a JSON object")
        return cls.from_dict(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _enum(enum_type: type[StrEnum], value: Any, where: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(member.value for member in enum_type)
        raise ManifestError(f"{where} must be one of {choices}; got {value!r}") from None


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ManifestError(f"{where} has unknown fields {unknown}; known fields: {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as error:
        raise ManifestError(f"{where} is malformed: {error}") from error
