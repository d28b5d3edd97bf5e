"""Merge a weights folder's LoRA into phi-2 and write a standalone folder.

    python -m training.merge_adapter --weights runs/stage2/weights --out runs/stage2/merged

The result is both a transformers model folder (`AutoModelForCausalLM.from_pretrained(out)` loads the
merged language model, with its tokenizer) and a weights folder the app serves without peft
(`manifest.json` names the folder itself as the language model, `projector.safetensors` is copied).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from inference.cli import ArgumentParser, UsageError, command
from inference.config import Manifest
from inference.loading import load_weights, resolve_model_reference
from inference.projector import PROJECTOR_FILE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge(weights: Path, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """The serving path's model (adapter merged, in `dtype`), saved as a transformers + weights folder."""
    manifest = Manifest.load(weights)
    if not manifest.adapter:
        raise UsageError(f"--weights {weights} has no adapter to merge")
    loaded = load_weights(weights, dtype=dtype)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    loaded.model.language_model.save_pretrained(staging)
    loaded.tokenizer.save_pretrained(staging)
    shutil.copy2(weights / PROJECTOR_FILE, staging / PROJECTOR_FILE)
    vision_model = resolve_model_reference(weights, manifest.vision_model)
    replace(manifest, language_model=".", vision_model=vision_model, adapter=False).save(staging)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


@command
def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=Path, required=True, help="weights folder with an adapter/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="precision of the merged weights")
    args = parser.parse_args(argv)
    out = merge(args.weights, args.out, DTYPES[args.dtype])
    print(f"merged model and weights folder: {out}")
    return out


if __name__ == "__main__":
    main()
