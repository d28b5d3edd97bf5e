"""Export a weights folder as llama.cpp's pair of GGUF files, the files llama.cpp, ollama and LM Studio load.

    python -m training.export_gguf --weights runs/stage2/weights --out runs/stage2/gguf --type q8_0

Writes `language-model-<type>.gguf` (LoRA merged in fp32), `mmproj-f16.gguf` (vision encoder and
projector) and a README (the folder's model card, with the llama-server, llama-mtmd-cli and ollama
commands); `--push-to-hub OWNER/NAME` uploads the folder. What goes into the files, and what llama.cpp
computes differently: inference/gguf_files.py.
"""

from __future__ import annotations

from pathlib import Path

from inference.cli import ArgumentParser, UsageError, command
from inference.gguf_files import KINDS, Exported, export
from inference.hub import parse_reference
from training.hub_upload import push_folder


@command
def main(argv: list[str] | None = None) -> Exported:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--weights", required=True, help="a weights folder or Hub repo id")
    parser.add_argument("--out", type=Path, required=True, help="folder the GGUF files and their README go to")
    parser.add_argument(
        "--type", default="q8_0", choices=KINDS, help="language model: f16, q8_0 (half of f16) or q4_k_m (a third)"
    )
    parser.add_argument("--push-to-hub", default="", metavar="OWNER/NAME", help="push the folder to this model repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = parser.parse_args(argv)
    if args.push_to_hub and (parse_reference(args.push_to_hub) is None or "@" in args.push_to_hub):
        raise UsageError(f"--push-to-hub {args.push_to_hub!r} is not a Hub repo id (expected OWNER/NAME)")
    exported = export(args.weights, args.out, args.type)
    for path in (exported.language_model, exported.mmproj):
        if path is not None:
            print(f"{path}: {path.stat().st_size / 1e6:.1f} MB")
    if args.push_to_hub:
        push_folder(args.out, args.push_to_hub, args.private, f"GGUF export ({args.type}) of {args.weights}")
    return exported


if __name__ == "__main__":
    main()
