"""Serve the original project's published checkpoint: import it into a weights folder of this project.

The original deployment (the Space `MadhurGarg/multi-modalLLM`) holds `model_chkpt/ft_projection.pth`,
the state dict of a `torch.nn.Linear(640, 2560)`, and `model_chkpt/qlora_adaptor/`, a peft LoRA
adapter for microsoft/phi-2. Its input: TinyCLIP's last hidden layer without CLS → the linear
projector → the embedding of token 23893 (" comment") → the question's tokens, decoded greedily.
The import reproduces that exactly: a linear projector, feature layer -1, and the `original` template.
`app.py` calls `original_weights()` when it has nothing else to serve; the command line is
`python -m training.import_original [--checkpoint FOLDER] [--out FOLDER]`.

Tensors are read with `torch.load(weights_only=True)` only, and written back as safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.constants import HF_HOME
from safetensors.torch import save_file
from torch import nn

from inference.cards import weights_card
from inference.config import (
    PHI2_ID,
    TINYCLIP_ID,
    TINYCLIP_PATCH_TOKENS,
    GenerationOptions,
    Manifest,
    ManifestError,
    ProjectorConfig,
    ProjectorType,
    TemplateName,
    atomic_write_text,
)
from inference.hub import error_reason
from inference.loading import save_weights

ORIGINAL_SPACE = "MadhurGarg/multi-modalLLM"
CHECKPOINT_DIR = "model_chkpt"
PROJECTION_FILE = "ft_projection.pth"
ADAPTER_DIR = "qlora_adaptor"
ORIGINAL_NEW_TOKENS = 50  # the original Space decoded exactly this many tokens: its weights never learned to stop
# Where the imported folder is kept: beside the Hub cache, so it is made once per machine.
DEFAULT_FOLDER = Path(os.environ.get("VQA_ORIGINAL_WEIGHTS", Path(HF_HOME) / "vqa-assistant" / "original-weights"))


def import_original(
    checkpoint: str | Path,
    folder: str | Path,
    language_model: str = PHI2_ID,
    vision_model: str = TINYCLIP_ID,
    image_tokens: int = TINYCLIP_PATCH_TOKENS,
    revision: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Convert the original checkpoint (a folder holding `model_chkpt/`, or `model_chkpt` itself).

    `revision` (the Space's commit the files came from) is recorded in the manifest; when `folder`
    already holds an import of another commit, `log` says that the original changed.
    """
    checkpoint = Path(checkpoint)
    root = checkpoint / CHECKPOINT_DIR if (checkpoint / CHECKPOINT_DIR).is_dir() else checkpoint
    projection, adapter = root / PROJECTION_FILE, root / ADAPTER_DIR
    if not projection.is_file() or not (adapter / "adapter_config.json").is_file():
        raise ManifestError(f"{checkpoint} does not hold the original {PROJECTION_FILE} and {ADAPTER_DIR}/")
    projector = _load_projection(projection)
    manifest = Manifest(
        name=f"original project ({ORIGINAL_SPACE})",
        language_model=language_model,
        vision_model=vision_model,
        vision_feature_layer=-1,  # last_hidden_state: the last layer's output, before post-layernorm
        image_tokens=image_tokens,
        projector=ProjectorConfig(ProjectorType.LINEAR, projector.in_features, projector.out_features),
        template=TemplateName.ORIGINAL,
        adapter=True,
        generation=GenerationOptions(max_new_tokens=ORIGINAL_NEW_TOKENS),
        training={
            "stage": "imported",
            "source": f"https://huggingface.co/spaces/{ORIGINAL_SPACE}",
            "source_revision": revision,
            "note": (
                f"The projector and QLoRA adapter published by the ERA-V1 capstone project (Space `{ORIGINAL_SPACE}`), "
                "converted to this project's weights format: TinyCLIP's last-layer patch features, a linear "
                "projector, the embedding of token 23893 as a separator, then the question"
            ),
            "command": "python -m training.import_original",
        },
    )
    previous = _imported_revision(Path(folder))
    if previous is not None and previous != revision:
        log(f"the original Space's checkpoint changed since the last import ({previous} → {revision}): re-imported")
    with tempfile.TemporaryDirectory() as staging:
        converted = _convert_adapter(adapter, Path(staging) / "adapter", language_model)
        folder = save_weights(folder, manifest, projector, adapter_files=converted)
    atomic_write_text(folder / "README.md", weights_card(folder))
    return folder


def _imported_revision(folder: Path) -> str | None:
    """The Space commit an earlier import into `folder` recorded; None when there is none (or no import)."""
    try:
        return Manifest.load(folder).training.get("source_revision")
    except ManifestError:
        return None


def _load_projection(path: Path) -> nn.Linear:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ManifestError(f"{path} is not a loadable tensor file: {error}") from None
    weight, bias = (state.get("weight"), state.get("bias")) if isinstance(state, dict) else (None, None)
    if not (isinstance(weight, torch.Tensor) and weight.ndim == 2 and isinstance(bias, torch.Tensor)):
        raise ManifestError(f"{path} is not a Linear layer's state dict (weight and bias)")
    if set(state) != {"weight", "bias"} or bias.shape != (weight.shape[0],):
        raise ManifestError(f"{path} has keys {sorted(state)} / shapes that are not one Linear layer's")
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    layer.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return layer


def _convert_adapter(source: Path, target: Path, language_model: str) -> Path:
    """Copy the adapter config (pointed at `language_model`) and its weights as safetensors."""
    target.mkdir(parents=True)
    config = json.loads((source / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = language_model
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (source / "adapter_model.safetensors").is_file():
        shutil.copy2(source / "adapter_model.safetensors", target / "adapter_model.safetensors")
    elif (source / "adapter_model.bin").is_file():
        state = torch.load(source / "adapter_model.bin", map_location="cpu", weights_only=True)
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, target / "adapter_model.safetensors")
    else:
        raise ManifestError(f"{source} has no adapter_model.safetensors or adapter_model.bin")
    return target


def original_weights(folder: str | Path | None = None, refresh: bool = False) -> Path:
    """The imported original checkpoint: downloaded and converted on first use, then reused offline.

    With `refresh`, the Space is looked at again and its checkpoint re-imported (saying so when it changed).
    """
    folder = Path(folder or DEFAULT_FOLDER)
    if (folder / "manifest.json").is_file() and not refresh:
        return folder
    try:
        snapshot = snapshot_download(
            ORIGINAL_SPACE,
            repo_type="space",
            allow_patterns=[f"{CHECKPOINT_DIR}/{PROJECTION_FILE}", f"{CHECKPOINT_DIR}/{ADAPTER_DIR}/*"],
        )
    except Exception as error:
        raise ManifestError(
            f"the original checkpoint could not be downloaded from Space {ORIGINAL_SPACE}: {error_reason(error)}"
        ) from None
    return import_original(snapshot, folder, revision=Path(snapshot).name)  # the Hub cache names it by commit
