"""Model cards (README.md with Hub metadata), one function per kind of folder this project writes.

- `weights_card`: a multimodal weights folder (manifest, projector, optional LoRA): what training's
  stages and the original checkpoint's import write, and what the app serves.
- `language_model_card`: a transformers model folder of a language model alone (pretraining's output).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData

from inference.config import Manifest

# The run summary's entries shown in a card's results table, when present.
SUMMARY_METRICS = ("steps", "final_train_loss", "final_eval_loss", "train_loss", "eval_loss", "seconds")
MULTIMODAL_TAGS = ("llava", "multimodal", "phi-2", "tinyclip", "vision-language")


def weights_card(folder: str | Path, summary: dict[str, Any] | None = None, datasets: Sequence[str] = ()) -> str:
    """The card of a weights folder, from its manifest (what it is, how it was made) and a run summary."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    stage = manifest.training.get("stage", "training")
    text = (
        f"Multimodal weights ({stage}) for a LLaVA-style assistant: `{manifest.vision_model}` image features, "
        f"projected into `{manifest.language_model}`, which answers questions about the image."
    )
    if manifest.training.get("note"):
        text += f" {manifest.training['note']}."
    parts = [
        "Served by this project's app: `python app.py --weights OWNER/THIS_REPO` (or a local copy).",
        "",
        f"- vision model: `{manifest.vision_model}` (hidden layer {manifest.vision_feature_layer}, "
        f"{manifest.image_tokens} patch tokens)",
        f"- projector: {manifest.projector.type.value}, {manifest.projector.in_features} → "
        f"{manifest.projector.out_features}",
        f"- language model: `{manifest.language_model}`" + (" + LoRA adapter (`adapter/`)" if manifest.adapter else ""),
        f"- prompt template: `{manifest.template.value}`",
    ]
    return _card(
        title=manifest.name,
        summary=text,
        details=parts,
        base_models=[manifest.language_model, manifest.vision_model],
        library_name="peft" if manifest.adapter else "transformers",
        pipeline_tag="image-text-to-text",
        datasets=datasets,
        tags=MULTIMODAL_TAGS,
        command=manifest.training.get("command"),
        summary_metrics=summary or {},
        has_plot=_has_plot(folder),
    )


def language_model_card(
    folder: str | Path,
    *,
    title: str,
    summary: str,
    datasets: Sequence[str] = (),
    command: str | None = None,
    run_summary: dict[str, Any] | None = None,
) -> str:
    """The card of a transformers causal-LM folder trained from scratch (no base model)."""
    return _card(
        title=title,
        summary=summary,
        details=[],
        base_models=[],
        library_name="transformers",
        pipeline_tag="text-generation",
        datasets=datasets,
        tags=("phi", "pretraining", "from-scratch", "causal-lm"),
        command=command,
        summary_metrics=run_summary or {},
        has_plot=_has_plot(Path(folder)),
    )


def _has_plot(folder: Path) -> bool:
    """The run's loss plot is beside the folder while training, inside it once published."""
    return (folder / "loss.png").is_file() or (folder.parent / "loss.png").is_file()


def _card(
    *,
    title: str,
    summary: str,
    details: list[str],
    base_models: Sequence[str],
    library_name: str,
    pipeline_tag: str,
    datasets: Sequence[str],
    tags: Sequence[str],
    command: str | None,
    summary_metrics: dict[str, Any],
    has_plot: bool,
    license: str = "mit",
) -> str:
    data = ModelCardData(
        base_model=[model for model in base_models if not Path(model).is_absolute()] or None,
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        datasets=list(datasets) or None,
        license=license,
        tags=list(tags) or None,
    )
    lines = ["---", data.to_yaml(), "---", "", f"# {title}", "", summary, ""]
    if details:
        lines += [*details, ""]
    if command:
        lines += ["## How it was made", "", "```bash", command, "```", ""]
    metrics = {name: summary_metrics[name] for name in SUMMARY_METRICS if summary_metrics.get(name) is not None}
    if metrics:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in metrics.items()]
        lines.append("")
    if has_plot:
        lines += ["![training and held-out loss](loss.png)", ""]
    return "\n".join(lines)
