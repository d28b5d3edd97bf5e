"""What serving makes once from a weights folder and keeps, and the keys that say when it is stale.

The torch backend keeps its int8 language model (`int8/`), the llama.cpp backend its GGUF export
(`gguf/`), both under `SERVING_CACHE` (a folder in the Hub cache) or wherever the caller says. An entry
is keyed by what it is made from, read without hashing gigabytes (`source_stamp`: the folder's place,
manifest and weight files, the base language model), and by the code that makes it, so retrained
weights, another base model or a changed converter make it afresh. An int8 model published by training
in the weights folder's own `int8/` is keyed by `int8_source`, which is the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from huggingface_hub.constants import HF_HOME
from transformers.utils import cached_file

from inference import gguf_files
from inference.config import Manifest
from inference.hub import model_source
from inference.int8_files import INT8_DIR, saved_source
from inference.loading import ADAPTER_DIR, resolve_model_reference
from inference.precision import QUANTIZER_VERSION

SERVING_CACHE = Path(HF_HOME) / "vqa-assistant"


def int8_location(folder: Path, manifest: Manifest, cache: Path | None) -> Path | None:
    """Where this weights folder's int8 language model is, or is to be saved: the folder's own `int8/`
    when it was made from these weights (published by training), else a cache entry keyed by the
    sources (`source_stamp`), the torch version and the quantizer's code; None without a cache."""
    published = folder / INT8_DIR
    if saved_source(published) == int8_source(folder, manifest):
        return published
    if cache is None:
        return None
    return cache / cache_key([*source_stamp(folder, manifest), f"torch {torch.__version__}", QUANTIZER_VERSION])


def int8_source(folder: Path, manifest: Manifest) -> str:
    """What an int8 language model is made from, the same on every machine: the manifest (base model,
    template, training record), the adapter's bytes, and a base model inside the folder (merged weights)
    by its files' names and sizes; hashing gigabytes of merged weights at every start is what this avoids."""
    digest = hashlib.sha256(json.dumps(manifest.to_dict(), sort_keys=True).encode())
    if manifest.adapter:
        with open(folder / ADAPTER_DIR / "adapter_model.safetensors", "rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    base = Path(model_source(resolve_model_reference(folder, manifest.language_model)))
    if base.is_dir():
        digest.update("".join(f"{path.name} {path.stat().st_size}\n" for path in _model_files(base)).encode())
    return digest.hexdigest()


def _model_files(folder: Path) -> list[Path]:
    """A model folder's config and weights (not its tokenizer, card or reports)."""
    return [path for path in sorted(folder.iterdir()) if path.suffix == ".safetensors" or path.name == "config.json"]


def source_stamp(folder: Path, manifest: Manifest) -> list[str]:
    """What a serving artefact made from a weights folder (an int8 model, a GGUF export) depends on, without
    reading gigabytes: the folder's place, manifest and weight files (size and time), and the base language
    model (a local folder's files, or the Hub snapshot's folder, which is named by its commit)."""
    stamp = [str(folder.resolve()), json.dumps(manifest.to_dict(), sort_keys=True)]
    stamp += [_file_stamp(path, folder) for path in sorted(folder.rglob("*.safetensors"))]
    reference = model_source(resolve_model_reference(folder, manifest.language_model))
    if Path(reference).is_dir():
        base = Path(reference)
        stamp += [_file_stamp(path, base) for path in _model_files(base)]
    else:
        stamp.append(str(Path(cached_file(reference, "config.json")).parent))  # .../snapshots/<commit>
    return [*stamp, reference]


def cache_key(stamp: list[str]) -> str:
    return hashlib.sha1("\n".join(stamp).encode(), usedforsecurity=False).hexdigest()[:16]


def _file_stamp(path: Path, root: Path) -> str:
    status = path.stat()
    return f"{path.relative_to(root)} {status.st_size} {status.st_mtime_ns}"


def gguf_location(folder: Path, manifest: Manifest, cache: Path) -> Path:
    """Where this weights folder's GGUF export is kept in `cache`: keyed by its sources and the exporter's code."""
    exporter = hashlib.sha1(Path(gguf_files.__file__).read_bytes(), usedforsecurity=False).hexdigest()
    return cache / cache_key([*source_stamp(folder, manifest), f"exporter {exporter}"])
