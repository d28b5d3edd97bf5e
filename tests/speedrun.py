"""The tiny recipe's checks: accuracy of the untrained models (what training starts from), llama.cpp's
agreement with PyTorch on the trained weights, and the accuracy table the test prints.

The run itself is the conductor: `python -m training.refresh --recipe training/recipes/tiny.yaml
--workdir OUT` (data, stand-in models, features, stage 1, stage 2, evaluation, merged weights, GGUF).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image

from inference import tiny
from inference.config import GenerationOptions, ProjectorType
from inference.loading import load_weights
from inference.precision import Precision
from inference.prompt import Conversation, Turn, render
from inference.vision import pixel_values
from training import evaluate
from training.shapes import CHANCE, QUESTIONS, accuracy_by_kind, language_texts, scenes


def untrained_accuracy(workdir: Path, seed: int = 0) -> dict[str, float]:
    """What training starts from: the run's own base models in `workdir` (a tiny refresh's workdir) with a
    fresh projector and no adapter, asked the held-out questions."""
    untrained = tiny.build_weights_folder(
        workdir / "untrained",
        workdir / "models" / "phi",
        workdir / "models" / "clip",
        ProjectorType.MLP2X_GELU,
        adapter=False,
        seed=seed,
        feature_layer=-2,
    )
    held_out = workdir / "data" / "llava" / "instruct_val.json"
    return accuracy_by_kind(evaluate.evaluate(untrained, held_out, workdir / "data" / "shapes", max_new_tokens=6))


def llama_cpp_agreement(out: Path, questions: int = 10, tokens: int = 8) -> dict[str, float]:
    """How often llama.cpp's first `tokens` greedy tokens equal PyTorch fp32's, on the trained weights in
    `out` (after `run`) exported as GGUF: held-out image questions with the image encoded in PyTorch (the
    app's llama.cpp backend) and by llama.cpp's mmproj, and text-only prompts; images at 224 × 224, the
    vision model's own size, so no resizing differs."""
    from inference.backends.llamacpp import LlamaCppBackend
    from inference.gguf_files import export
    from tests.llamacpp_vision import LlamaCppVision

    weights = out / "stage2" / "weights"
    loaded = load_weights(weights, precision=Precision.FP32)
    model, manifest, options = loaded.model, loaded.manifest, GenerationOptions(max_new_tokens=tokens)
    kinds = list(QUESTIONS)
    cases = []  # (prompt ids, image or None)
    for index in range(questions):
        image = Image.open(out / "data" / "shapes" / "val2017" / f"{100_000 + index:012d}.png").convert("RGB")
        conversation = Conversation((Turn(QUESTIONS[kinds[index % len(kinds)]][0]),))
        rendered = render(manifest.template, conversation, loaded.tokenizer, True, image_tokens=manifest.image_tokens)
        cases.append((rendered.input_ids, image.resize((224, 224), Image.Resampling.BICUBIC)))
    for text in language_texts(scenes(questions, random.Random(0)))[:questions]:
        cases.append((loaded.tokenizer(text[: len(text) // 2])["input_ids"], None))
    with torch.no_grad():
        embeds = [model.encode_images(pixel_values([image], 224)) if image else None for _, image in cases]
        expected = [model.generate(ids, embed, options) for (ids, _), embed in zip(cases, embeds, strict=True)]
    agreement = {}
    for kind in ("f16", "q8_0"):
        exported = export(weights, out / f"gguf-{kind}", kind)
        served = LlamaCppBackend(model, exported.language_model, threads=2)
        answers = [served.generate(ids, embed, options) for (ids, _), embed in zip(cases, embeds, strict=True)]
        same = [answer == want for answer, want in zip(answers, expected, strict=True)]
        agreement[f"{kind}, image encoded in PyTorch"] = sum(same[:questions]) / questions
        agreement[f"{kind}, text only"] = sum(same[questions:]) / questions
        vision = LlamaCppVision(exported.mmproj, served.llm, threads=2)
        images = [torch.from_numpy(vision.encode(image))[None] for _, image in cases[:questions]]
        answers = [served.generate(ids, embed, options) for (ids, _), embed in zip(cases, images, strict=False)]
        same = [answer == want for answer, want in zip(answers, expected, strict=False)]
        agreement[f"{kind}, image encoded by llama.cpp's mmproj"] = sum(same) / questions
    return agreement


def table(result: dict[str, dict[str, float]]) -> str:
    lines = ["| held-out question | chance | untrained | trained |", "|---|---|---|---|"]
    for kind in result["trained"]:
        untrained, trained = result["untrained"][kind], result["trained"][kind]
        lines.append(f"| {kind} | {100 * CHANCE[kind]:.0f} % | {100 * untrained:.0f} % | {100 * trained:.0f} % |")
    return "\n".join(lines)
