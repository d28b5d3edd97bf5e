"""Projectors: vision patch features → the language model's embedding space."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from inference.config import ProjectorConfig, ProjectorType

PROJECTOR_FILE = "projector.safetensors"


def build_projector(config: ProjectorConfig) -> nn.Module:
    """A freshly initialised projector of the configured type."""
    if config.type is ProjectorType.LINEAR:
        return nn.Linear(config.in_features, config.out_features)
    if config.type is ProjectorType.MLP2X_GELU:
        return nn.Sequential(
            nn.Linear(config.in_features, config.out_features),
            nn.GELU(),
            nn.Linear(config.out_features, config.out_features),
        )
    raise ValueError(f"unknown projector type {config.type!r}")


def save_projector(projector: nn.Module, path: str | Path) -> None:
    """Write the projector's weights (fp32 or its own dtype) as safetensors."""
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in projector.state_dict().items()}
    save_file(state, str(path))


def load_projector(config: ProjectorConfig, path: str | Path) -> nn.Module:
    """Build a projector of `config`'s type and shape and fill it from `path`, strictly."""
    projector = build_projector(config)
    state = load_file(str(path))
    expected = projector.state_dict()
    if set(state) != set(expected):
        raise ValueError(
            f"{path} holds tensors {sorted(state)}, but a {config.type.value} projector has {sorted(expected)}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the manifest's projector "
                f"({config.in_features}→{config.out_features}) needs {tuple(expected[name].shape)}"
            )
    projector.load_state_dict(state)  # copied into the fp32 parameters, whatever dtype was stored
    return projector
