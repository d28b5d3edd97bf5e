"""Weights folders, and the one builder that assembles `MultimodalPhi` from a manifest.

A weights folder holds `manifest.json`, `projector.safetensors` and, when the manifest says so, a peft
LoRA `adapter/`. The manifest names the base models (Hub ids or local folders); nothing is guessed
from folder names. `build_model` is the only place the vision tower, projector and language model are
put together: serving (`load_weights`), stage 1, stage 2 and merging all call it, and differ only in
how the language model is loaded (the `language_model` argument).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from inference.config import Manifest, ManifestError, ProjectorConfig, ProjectorType, TemplateName
from inference.hub import error_reason, model_source, pin_revision, resolve_weights
from inference.int8_files import load_int8, save_int8, saved_source
from inference.model import MultimodalPhi
from inference.precision import Precision, quantize_int8, returning_freed_memory
from inference.projector import PROJECTOR_FILE, build_projector, load_projector, save_projector
from inference.prompt import IMAGE_PLACEHOLDER_ID, Conversation, Turn, render
from inference.vision import VisionTower

ADAPTER_DIR = "adapter"
# Without a serving precision (training, evaluation), the CPU loads bf16: fp32 phi-2 peaks above a CPU
# Basic Space's 16 GB while loading. Serving chooses a `Precision` (int8 by default).
DEFAULT_CPU_DTYPE = torch.bfloat16

CALIBRATION_QUESTION = "What is in this picture?\nDescribe it in a few words, then name its colours."

# Loads the causal LM from a resolved reference (Hub id or folder): each phase has its own.
LanguageModelLoader = Callable[[str], PreTrainedModel]


@dataclass
class LoadedWeights:
    model: MultimodalPhi
    tokenizer: PreTrainedTokenizerBase
    manifest: Manifest


def build_model(
    manifest: Manifest, folder: Path | None, language_model: LanguageModelLoader
) -> tuple[MultimodalPhi, PreTrainedTokenizerBase]:
    """Assemble the model a manifest describes: tokenizer, language model, vision tower, projector.

    `folder` is the weights folder the manifest belongs to: references relative to it are resolved and
    its projector is loaded. Without one (stage 1), references are taken as they are and the projector
    is new, initialised from the current RNG state. `language_model` loads the causal LM: frozen for
    stage 1, with a (Q)LoRA for stage 2, with the adapter merged for serving and merging.
    """
    language_model_id = model_source(resolve_model_reference(folder, manifest.language_model))
    vision_model_id = model_source(resolve_model_reference(folder, manifest.vision_model))
    with _loading("language model", language_model_id):
        tokenizer = AutoTokenizer.from_pretrained(language_model_id)
        causal_lm = language_model(language_model_id)
    with _loading("vision model", vision_model_id):
        vision_tower = VisionTower.from_pretrained(vision_model_id, manifest.vision_feature_layer)
    if folder is None:
        projector = build_projector(manifest.projector)
    else:
        projector = load_projector(manifest.projector, folder / PROJECTOR_FILE)
    _check_shapes(manifest, vision_tower, causal_lm)
    return MultimodalPhi(vision_tower, projector, causal_lm, tokenizer.eos_token_id), tokenizer


@contextmanager
def _loading(kind: str, reference: str) -> Iterator[None]:
    """A base model that cannot be found (a wrong folder, a Hub id offline and not cached) as one clear error."""
    try:
        yield
    except OSError as error:
        raise ManifestError(
            f"the {kind} {reference!r} could not be loaded ({error_reason(error)}): give a local folder, or a Hub id "
            "that is cached or reachable"
        ) from None


def pretrained(dtype: torch.dtype | str) -> LanguageModelLoader:
    """The causal LM as published, in `dtype`."""
    return lambda reference: AutoModelForCausalLM.from_pretrained(reference, dtype=dtype)


def load_weights(
    folder: str | Path,
    dtype: torch.dtype = DEFAULT_CPU_DTYPE,
    device: str = "cpu",
    precision: Precision | None = None,
    int8_path: Path | None = None,
) -> LoadedWeights:
    """Build the model a weights folder describes, with its LoRA merged, ready for inference.

    `folder` is a local folder or a Hub repo id (`OWNER/NAME[@REVISION]`), downloaded once into the Hub cache.
    `precision` (CPU serving) overrides `dtype`: the model is loaded in `precision.load_dtype` (int8: the
    checkpoint's own), the LoRA merged in that dtype, then int8 layers are made one decoder layer at a
    time. With `int8_path` (where this folder's int8 model is kept, `inference.serving_cache.int8_location`)
    a saved int8 model is loaded from there, or the one made now is saved there for later loads.
    """
    if precision is not None:
        dtype = precision.load_dtype
    folder = resolve_weights(folder)
    manifest = Manifest.load(folder)
    adapter = folder / ADAPTER_DIR
    if manifest.adapter and not adapter.is_dir():
        raise ManifestError(f"{folder}/manifest.json says there is an adapter, but {adapter} is missing")
    saved = int8_path if precision is Precision.INT8 else None

    def merged(reference: str) -> PreTrainedModel:
        if saved is not None and saved_source(saved) is not None:
            return load_int8(saved)
        with returning_freed_memory():  # the merge and the conversion free as much as they allocate
            language_model = pretrained(dtype)(reference)
            if manifest.adapter:
                language_model = merge_adapter(language_model, adapter)
            if precision is Precision.INT8:  # bf16 and fp32 serve as loaded
                ids = calibration_ids(AutoTokenizer.from_pretrained(reference), manifest.template)
                language_model = quantize_int8(language_model, ids)
        if saved is not None:
            save_int8(language_model, saved)
            for other in saved.parent.iterdir():  # the cache keeps the latest int8 model only
                if other != saved and other.is_dir():
                    shutil.rmtree(other, ignore_errors=True)
        return language_model

    model, tokenizer = build_model(manifest, folder, merged)
    return LoadedWeights(model.to(device).eval(), tokenizer, manifest)


def calibration_ids(tokenizer: PreTrainedTokenizerBase, template: TemplateName) -> list[int]:
    """What int8 calibrates on: a served prompt's text (system prompt, template, a question with "\\n"), no image."""
    conversation = Conversation((Turn(CALIBRATION_QUESTION),))
    rendered = render(template, conversation, tokenizer, True, image_tokens=1)
    return [token for token in rendered.input_ids if token != IMAGE_PLACEHOLDER_ID]


def load_for_evaluation(folder: str | Path) -> LoadedWeights:
    """The weights with the LoRA merged, for evaluation: bf16 on a GPU, fp32 (the reference) on the CPU."""
    if torch.cuda.is_available():
        return load_weights(folder, dtype=torch.bfloat16, device="cuda")
    return load_weights(folder, dtype=torch.float32)


def merge_adapter(language_model: PreTrainedModel, adapter: Path) -> PreTrainedModel:
    """The peft adapter in `adapter` merged into `language_model`, once every one of its tensors was placed.

    peft only warns about saved tensors whose names match no module of the model, and would then serve
    the base model without them: here each saved tensor must have become a parameter of the model.
    """
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise ManifestError(f"{adapter} has no adapter_model.safetensors")
    with safe_open(str(weights), "pt") as file:
        saved = list(file.keys())
    peft_model = PeftModel.from_pretrained(language_model, str(adapter))
    placed = {name for name, _ in peft_model.named_parameters()}
    missing = [name for name in saved if _adapter_parameter(name, peft_model.active_adapter) not in placed]
    if missing:
        raise ManifestError(
            f"{len(missing)} of the {len(saved)} tensors of the adapter in {adapter} fit no module of the language "
            f"model (first: {missing[0]}): it was made for another model, or its names are wrong"
        )
    return peft_model.merge_and_unload()


def _adapter_parameter(saved_name: str, adapter_name: str) -> str:
    """A saved adapter tensor's parameter name in the model: `...q_proj.lora_A.weight` → `...lora_A.default.weight`."""
    module, _, tensor = saved_name.rpartition(".")
    if tensor.startswith("lora_"):  # a parameter saved under its own name (LoRA embeddings)
        return f"{saved_name}.{adapter_name}"
    return f"{module}.{adapter_name}.{tensor}"


def new_manifest(
    name: str,
    language_model: str,
    vision_model: str,
    vision_feature_layer: int,
    projector: ProjectorType,
    template: TemplateName,
    adapter: bool = False,
) -> Manifest:
    """The manifest of new weights over two base models, their widths and patch count read from their configs.
    A Hub id is recorded with the commit it was loaded from (`owner/name@commit`), so the weights name the
    base model they were made over, and a Space preloads and serves exactly that."""
    with _loading("language model", language_model):
        text_width = AutoConfig.from_pretrained(model_source(language_model)).hidden_size
    with _loading("vision model", vision_model):
        vision = CLIPVisionConfig.from_pretrained(model_source(vision_model))
    return Manifest(
        name=name,
        language_model=pin_revision(language_model),
        vision_model=pin_revision(vision_model),
        vision_feature_layer=vision_feature_layer,
        image_tokens=(vision.image_size // vision.patch_size) ** 2,
        projector=ProjectorConfig(ProjectorType(projector), vision.hidden_size, text_width),
        template=template,
        adapter=adapter,
    )


def resolve_model_reference(folder: Path | None, reference: str) -> str:
    """A Hub id or absolute folder as it is; `./...` or `../...` relative to the weights folder itself."""
    if folder is not None and (reference == "." or reference.startswith(("./", "../"))):
        return str((folder / reference).resolve())
    return reference


def _check_shapes(manifest: Manifest, vision_tower: VisionTower, language_model: PreTrainedModel) -> None:
    text_width = language_model.get_input_embeddings().embedding_dim
    problems = []
    if vision_tower.width != manifest.projector.in_features:
        problems.append(f"vision width {vision_tower.width} ≠ projector input {manifest.projector.in_features}")
    if text_width != manifest.projector.out_features:
        problems.append(f"language model width {text_width} ≠ projector output {manifest.projector.out_features}")
    if vision_tower.num_patches != manifest.image_tokens:
        problems.append(f"vision model gives {vision_tower.num_patches} patches ≠ image_tokens {manifest.image_tokens}")
    if problems:
        raise ManifestError("the manifest does not match its base models: " + "; ".join(problems))


def save_weights(
    folder: str | Path,
    manifest: Manifest,
    projector: torch.nn.Module,
    adapter_model: PeftModel | None = None,
    adapter_files: Path | None = None,
) -> Path:
    """Write a complete weights folder, atomically: readers see the old folder or the new, never a mix.

    The adapter comes from a peft model (`adapter_model`) or an already saved peft folder (`adapter_files`).
    """
    folder = Path(folder)
    if adapter_model is not None and adapter_files is not None:
        raise ValueError("give adapter_model or adapter_files, not both")
    if manifest.adapter != (adapter_model is not None or adapter_files is not None):
        raise ValueError("manifest.adapter must be true exactly when an adapter is given")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.staging."))
    try:
        save_projector(projector, staging / PROJECTOR_FILE)
        if adapter_model is not None:
            adapter_model.save_pretrained(str(staging / ADAPTER_DIR))
        if adapter_files is not None:
            shutil.copytree(adapter_files, staging / ADAPTER_DIR)
        manifest.save(staging)
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` where `target` is, replacing it; readers see one or the other, never a mix."""
    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
    target.rename(old / target.name)
    new.rename(target)
    shutil.rmtree(old)
