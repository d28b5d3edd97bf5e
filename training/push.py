"""Push a saved weights or model folder to the Hugging Face Hub, in one commit.

    python -m training.push runs/stage2/weights OWNER/NAME [--private]

Training scripts push by themselves with `--push-to-hub OWNER/NAME`; this command pushes any folder
that is already saved (for instance after a failed upload). Log in first with `hf auth login`, or
set HF_TOKEN. The folder is read, never changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from inference.config import Manifest
from inference.hub import PublishError, model_card, push_folder

SUMMARY_METRICS = ("steps", "final_train_loss", "final_eval_loss", "train_loss", "eval_loss", "seconds")


def weights_card(folder: Path, summary: dict[str, Any], datasets: tuple[str, ...] = ()) -> str:
    """The model card of a multimodal weights folder, from its manifest and the run's summary."""
    manifest = Manifest.load(folder)
    stage = manifest.training.get("stage", "training")
    return model_card(
        manifest,
        title=manifest.name,
        summary=(
            f"Multimodal weights ({stage}) for a LLaVA-style assistant: `{manifest.vision_model}` image features, "
            f"projected into `{manifest.language_model}`, which answers questions about the image."
        ),
        base_models=[manifest.language_model, manifest.vision_model],
        library_name="peft" if manifest.adapter else "transformers",
        pipeline_tag="image-text-to-text",
        datasets=datasets,
        tags=["llava", "multimodal", "phi-2", "tinyclip", "vision-language"],
        command=manifest.training.get("command"),
        metrics={name: summary[name] for name in SUMMARY_METRICS if name in summary},
        has_plot=(folder.parent / "loss.png").is_file() or (folder / "loss.png").is_file(),
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a saved weights folder or transformers model folder")
    parser.add_argument("repo_id", help="Hub model repo, OWNER/NAME (created if it does not exist)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--message", help="commit message")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    try:
        return push_folder(args.folder, args.repo_id, args.private, args.message)
    except PublishError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
