"""The multimodal core shared by the app and training: TinyCLIP → projector → phi-2."""

from inference.assistant import Assistant, InputError, Reply
from inference.backends import Backend
from inference.config import GenerationOptions, Manifest, ProjectorConfig, ProjectorType, TemplateName
from inference.loading import load_weights, save_weights
from inference.model import MultimodalPhi

__all__ = [
    "Assistant",
    "Backend",
    "GenerationOptions",
    "InputError",
    "Manifest",
    "MultimodalPhi",
    "ProjectorConfig",
    "ProjectorType",
    "Reply",
    "TemplateName",
    "load_weights",
    "save_weights",
]
