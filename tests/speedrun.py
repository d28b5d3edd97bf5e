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
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from inference import tiny
from inference.config import ProjectorType
from tests import kit
from tests.synthetic_shapes import QUESTIONS, language_texts, make_dataset
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
