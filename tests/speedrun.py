"""CPU speedrun: the whole pipeline learning on synthetic shapes, in a few minutes on 2 cores.

    python -m tests.speedrun --out runs/speedrun --seed 0

Tiny random models stand in for phi-2 and TinyCLIP (nothing is downloaded). The steps are the real
entry points, called through their typed functions (`prepare(...)`, `run(Config(...))`, what each command
line runs): a text-only warm-up of the language model (phi-2 arrives pretrained; see
tests/synthetic_shapes.language_texts) → training.prepare_coco → training.prepare_instruct →
training.cache_features → training.stage1_align → training.stage2_instruct (4-bit QLoRA) → the
weights folder → Assistant (the app's path) answering every held-out question. Prints accuracy per
question type before and after training; loss plots are in OUT/stage1/loss.png and OUT/stage2/loss.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from PIL import Image

from inference import tiny
from inference.config import GenerationOptions, ProjectorType
from inference.loading import load_weights
from inference.precision import Precision
from inference.prompt import Conversation, Turn, render
from inference.vision import pixel_values
from tests import kit
from tests.synthetic_shapes import QUESTIONS, language_texts, make_dataset, scenes
from training import cache_features, evaluate, prepare_coco, prepare_instruct, stage1_align, stage2_instruct
from training.stage1_align import Stage1Config
from training.stage2_instruct import Stage2Config

KIND_OF_QUESTION = {question: kind for kind, (question, _) in QUESTIONS.items()}
COMMON = dict(num_workers=0, samples=2, log_every=5, warmup_ratio=0.05, batch_size=8, global_batch_size=16)


def accuracy_by_kind(report: dict) -> dict[str, float]:
    hits = defaultdict(list)
    for answer in report["answers"]:
        hits[KIND_OF_QUESTION[answer["question"]]].append(answer["exact"])
    return {kind: sum(values) / len(values) for kind, values in sorted(hits.items())}


CHANCE = {"colour": 1 / 3, "position": 1 / 2, "shape": 1 / 3}


def run(
    out: Path,
    seed: int = 0,
    stage1_epochs: float = 10,
    stage2_epochs: float = 12,
    clip_width: int = 64,
    train_images: int = 720,
    feature_layer: int = -2,
) -> dict[str, dict[str, float]]:
    torch.manual_seed(seed)
    data = out / "data"
    split_scenes = make_dataset(data, seed, train_images)
    tokenizer = kit.build_bpe_tokenizer()
    random_lm = tiny.build_tiny_phi(out / "models" / "phi-random", tokenizer, seed)
    language_model = kit.pretrain_tiny_phi(
        random_lm, out / "models" / "phi", language_texts(split_scenes["train"]), steps=400, seed=seed
    )
    vision_model = tiny.build_tiny_clip(out / "models" / "clip", seed, clip_width)

    llava = data / "llava"
    prepare_coco.prepare(data, llava)
    for split in ("train", "val"):
        prepare_instruct.prepare(
            data / f"instruct_{split}.json", data, llava / f"instruct_{split}.json", f"{split}2017"
        )
    data_files = [llava / name for name in sorted(os.listdir(llava))]
    cache_features.build_cache(data_files, data, data / "features", str(vision_model), feature_layer, num_workers=0)
    cached = dict(image_folder=str(data), feature_cache=str(data / "features"), seed=seed, save_every=1000)

    # Before training: the same language model with a fresh projector and no adapter.
    untrained = tiny.build_weights_folder(
        out / "untrained",
        language_model,
        vision_model,
        ProjectorType.MLP2X_GELU,
        adapter=False,
        seed=seed,
        feature_layer=feature_layer,
    )
    held_out = llava / "instruct_val.json"
    before = evaluate.evaluate(untrained, held_out, data, max_new_tokens=6)

    stage1 = Stage1Config(
        train_data=str(llava / "coco_captions_train2017.json"),
        eval_data=str(llava / "coco_captions_val2017.json"),
        language_model=str(language_model),
        vision_model=str(vision_model),
        vision_feature_layer=feature_layer,
        output_dir=str(out / "stage1"),
        epochs=stage1_epochs,
        lr=1e-2,
        eval_every=20,
        **cached,
        **COMMON,
    )
    stage1_align.run(stage1)
    stage2 = Stage2Config(
        stage1_weights=str(out / "stage1" / "weights"),
        train_data=str(llava / "instruct_train.json"),
        eval_data=str(held_out),
        output_dir=str(out / "stage2"),
        epochs=stage2_epochs,
        lr=1e-2,
        projector_lr=1e-2,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        eval_every=30,
        **cached,
        **COMMON,
    )
    stage2_instruct.run(stage2)
    after = evaluate.evaluate(out / "stage2" / "weights", held_out, data, max_new_tokens=6)
    result = {"untrained": accuracy_by_kind(before), "trained": accuracy_by_kind(after)}
    (out / "accuracy.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def llama_cpp_agreement(out: Path, questions: int = 10, tokens: int = 8) -> dict[str, float]:
    """How often llama.cpp's first `tokens` greedy tokens equal PyTorch fp32's, on the trained weights in
    `out` (after `run`) exported as GGUF: held-out image questions with the image encoded in PyTorch (the
    app's llama.cpp backend) and by llama.cpp's mmproj, and text-only prompts; images at 224 × 224, the
    vision model's own size, so no resizing differs."""
    from inference.gguf_files import export
    from inference.llamacpp import LlamaCppModel, LlamaCppVision

    weights = out / "stage2" / "weights"
    loaded = load_weights(weights, precision=Precision.FP32)
    model, manifest, options = loaded.model, loaded.manifest, GenerationOptions(max_new_tokens=tokens)
    kinds = list(QUESTIONS)
    cases = []  # (prompt ids, image or None)
    for index in range(questions):
        image = Image.open(out / "data" / "val2017" / f"{100_000 + index:012d}.png").convert("RGB")
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
        served = LlamaCppModel(model, exported.language_model, threads=2)
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/speedrun"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run(args.out, args.seed)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
