"""Model cards (README.md with Hub metadata), one function per kind of folder this project writes.

- `weights_card`: a multimodal weights folder (manifest, projector, optional LoRA): what training's
  stages and the original checkpoint's import write, and what the app serves.
- `language_model_card`: a transformers model folder of a language model alone (pretraining's output).
- `gguf_card`: a GGUF export for llama.cpp (training.export_gguf), with the commands that run it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData

from inference.config import Manifest
from inference.int8_files import INT8_DIR, INT8_FILE
from inference.prompt import PHI2_SYSTEM

# The run summary's entries shown in a card's results table, when present.
SUMMARY_METRICS = ("steps", "final_train_loss", "final_eval_loss", "train_loss", "eval_loss", "seconds",
                   "held_out_loss", "exact_match", "contains_match", "pope_f1")  # fmt: skip
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
        "For llama.cpp, ollama or LM Studio: `python -m training.export_gguf --weights OWNER/THIS_REPO --out gguf` "
        "writes the language model and the vision projector as GGUF, with the commands that run them "
        "(the app serves that folder with `--gguf`).",
        "",
        f"- vision model: `{manifest.vision_model}` (hidden layer {manifest.vision_feature_layer}, "
        f"{manifest.image_tokens} patch tokens)",
        f"- projector: {manifest.projector.type.value}, {manifest.projector.in_features} → "
        f"{manifest.projector.out_features}",
        f"- language model: `{manifest.language_model}`" + (" + LoRA adapter (`adapter/`)" if manifest.adapter else ""),
        *(
            ["- `int8/`: the language model quantized to int8 as the app serves it on the CPU (loaded, not redone)"]
            if (folder / INT8_DIR / INT8_FILE).is_file()
            else []
        ),
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


def gguf_card(manifest: Manifest, language_model: str, mmproj: str | None) -> str:
    """The card of an exported GGUF folder: the files, and how llama.cpp, its server and ollama run them."""
    files = [f"- `{language_model}`: `{manifest.language_model}` with the LoRA merged, llama.cpp's `phi2` architecture"]
    if mmproj:
        files.append(
            f"- `{mmproj}`: the vision encoder `{manifest.vision_model}` and the projector (llama.cpp's `mlp`)"
        )
        run = [
            "## Run it",
            "",
            "Checked by this project's tests, in llama.cpp through llama-cpp-python: the language model answers as "
            "PyTorch does, and the mmproj computes llama.cpp's LLaVA graph on these weights (but see the note "
            "below). Written from llama.cpp's and ollama's documentation and not run here: the commands below.",
            "",
            "```bash",
            f"llama-mtmd-cli -m {language_model} --mmproj {mmproj} --image photo.jpg -p 'What is in this picture?'",
            f"llama-server -m {language_model} --mmproj {mmproj} --port 8080  # OpenAI-compatible /v1/chat/completions",
            "```",
            "",
            "ollama (`ollama create NAME -f Modelfile`), with this project's chat template:",
            "",
            "```",
            f"FROM ./{language_model}",
            f"FROM ./{mmproj}",
            'TEMPLATE """{{ .System }}',
            '{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ if $i }}',
            '{{ end }}USER: {{ $m.Content }} ASSISTANT:{{ else if eq $m.Role "assistant" }} {{ $m.Content }}'
            '<|endoftext|>{{ end }}{{ end }}"""',
            f'SYSTEM """{PHI2_SYSTEM}"""',
            'PARAMETER stop "<|endoftext|>"',
            "```",
            "",
            "llama.cpp's LLaVA graph (up to at least the build in llama-cpp-python 0.3.36) puts CLIP's class "
            "token after the patches while feeding positions as if it came first (ggml-org/llama.cpp#25814): each "
            "patch gets its neighbour's position embedding, the first patch is dropped and the class token is fed "
            "as the last image position. The app's llama.cpp backend encodes images in PyTorch and is not "
            "affected; the project README measures what the bug costs through `--mmproj`.",
        ]
    else:
        files.append(
            f"- no mmproj: the {manifest.projector.type.value} projector has no llama.cpp counterpart; "
            "the project's app serves this pair with images encoded in PyTorch"
        )
        run = ["## Run it", "", "```bash", f"llama-cli -m {language_model} -p 'Hello'  # text only", "```"]
    return _card(
        title=f"{manifest.name} (GGUF)",
        summary=f"llama.cpp files of `{manifest.name}`, written by this project's `training.export_gguf`.",
        details=[*files, "", *run],
        base_models=[manifest.language_model, manifest.vision_model],
        library_name="gguf",
        pipeline_tag="image-text-to-text",
        datasets=(),
        tags=(*MULTIMODAL_TAGS, "gguf", "llama.cpp"),
        command=None,
        summary_metrics={},
        has_plot=False,
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
        # The card's base_model is a repo id: a pinned reference (owner/name@commit) is named without its commit.
        base_model=[model.partition("@")[0] for model in base_models if not Path(model).is_absolute()] or None,
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
