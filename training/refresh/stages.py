"""The stages `training.refresh` conducts: what each runs, what it leaves, how its products are checked.

Each stage is a function that does its work by calling the project's own commands (their typed entry
points: `prepare_coco.prepare`, `stage1_align.run`, ...), and a check that opens its products (JSON
parses, a weights folder's manifest loads, a feature cache covers every image) rather than trusting a
marker file. A stage whose check passes is skipped; an interrupted training stage continues from its
last checkpoint with --resume.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from inference.cards import weights_card
from inference.cli import UsageError
from inference.config import Manifest, ManifestError
from inference.gguf_files import export
from inference.int8_files import INT8_DIR, save_int8, saved_source
from inference.loading import load_for_evaluation, load_weights, replace_folder
from inference.precision import Precision
from inference.serving_cache import int8_source
from training import (
    cache_features,
    evaluate,
    merge_adapter,
    prepare_coco,
    prepare_instruct,
    prepare_text,
    pretrain,
    stage1_align,
    stage2_instruct,
)
from training.checkpoint import CHECKPOINT
from training.data import images_of, read_json_list
from training.downloads import download
from training.hub_upload import push_folder
from training.multimodal import COCO_DATASETS, INSTRUCT_DATASETS
from training.refresh.recipe import PretrainRecipe
from training.refresh.work import Work
from training.text_shards import META as CORPUS_META

LLAVA_INSTRUCT_FILE = "llava_instruct_150k.json"  # in the Hub data set INSTRUCT_DATASETS[0]
# POPE's COCO question files, at the commit of the POPE repository they were last changed in.
POPE_URL = "https://raw.githubusercontent.com/AoiDragon/POPE/7ef3026faa9a89ed11fd508385fad652fdc6349f/output/coco/"
POPE_SPLITS = ("random", "popular", "adversarial")


# --- data ----------------------------------------------------------------------------------------


def run_data(work: Work) -> dict[str, Any]:
    from training import shapes

    if work.shapes_data:
        settings = work.shape_settings
        split_scenes = shapes.make_dataset(
            work.images, work.seed, settings["train_images"], settings["held_out_images"]
        )
        shapes.pope_questions(work.root / "data", split_scenes["val"], work.seed)
        raw = {split: work.images / f"instruct_{split}.json" for split in ("train", "val")}
        prefix = {"train": "train2017", "val": "val2017"}
        coco = prepare_coco.prepare(work.images, work.llava)
    else:
        coco = prepare_coco.prepare(work.images, work.llava, download=True)
        raw = split_instructions(work)
        prefix = {"train": "train2017", "val": "train2017"}  # LLaVA-Instruct asks about COCO train2017 images
        fetch_pope(work.pope)
    counts = {
        split: prepare_instruct.prepare(raw[split], work.images, work.llava / f"instruct_{split}.json", prefix[split])[
            "kept"
        ]
        for split in raw
    }
    captions = {split: value["captions"] for split, value in coco.items()}
    return {"captions": captions, "conversations": counts}


def split_instructions(work: Work) -> dict[str, Path]:
    """LLaVA-Instruct-150K from the Hub cache, with `held_out` conversations (seeded choice) set apart."""
    from huggingface_hub import hf_hub_download

    records = read_json_list(hf_hub_download(INSTRUCT_DATASETS[0], LLAVA_INSTRUCT_FILE, repo_type="dataset"))
    order = list(range(len(records)))
    random.Random(work.seed).shuffle(order)
    held = set(order[: work.recipe.held_out])
    raw = {"train": work.llava / "raw_instruct_train.json", "val": work.llava / "raw_instruct_val.json"}
    raw["train"].parent.mkdir(parents=True, exist_ok=True)
    raw["train"].write_text(json.dumps([r for i, r in enumerate(records) if i not in held]))
    raw["val"].write_text(json.dumps([r for i, r in enumerate(records) if i in held]))
    return raw


def fetch_pope(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split in POPE_SPLITS:
        download(f"{POPE_URL}coco_pope_{split}.json", folder / f"coco_pope_{split}.json")


def data_done(work: Work) -> bool:
    try:
        if not all(read_json_list(path) for path in work.data_files()):
            return False
    except (OSError, UsageError, ValueError):
        return False
    pope = sorted(work.pope.glob("coco_pope_*.json"))
    return bool(pope) and all(path.read_text().strip() for path in pope)


# --- models --------------------------------------------------------------------------------------


def run_models(work: Work) -> dict[str, Any]:
    from inference import tiny
    from training import shapes

    if work.smoke and not work.recipe.built_here:
        return random_real_size_models(work)
    if work.smoke or work.recipe.built_here:
        settings = work.shape_settings
        tokenizer = shapes.build_bpe_tokenizer()
        phi = tiny.build_tiny_phi(work.models / "phi-random", tokenizer, work.seed)
        if settings["warm_up_steps"]:
            texts = shapes.language_texts(shapes.all_scenes())
            shapes.warm_up_language_model(phi, work.models / "phi", texts, settings["warm_up_steps"], work.seed)
        else:
            shutil.copytree(phi, work.models / "phi", dirs_exist_ok=True)
        tiny.build_tiny_clip(work.models / "clip", work.seed, settings["clip_width"])
        return {"language_model": work.language_model, "vision_model": work.vision_model}
    from huggingface_hub import snapshot_download

    for reference in (work.language_model, work.vision_model):
        snapshot_download(reference)  # into the Hub cache, where every stage looks for it
    return {"language_model": work.language_model, "vision_model": work.vision_model}


def random_real_size_models(work: Work) -> dict[str, Any]:
    """--smoke on a real recipe: random phi-2 (GPT-2's vocabulary, built offline) and TinyCLIP of the real sizes."""
    from transformers import CLIPVisionModel

    from inference import tiny
    from inference.dimensions import TINYCLIP_61M
    from inference.standins import random_phi

    tokenizer = tiny.build_gpt2_tokenizer()
    torch.manual_seed(work.seed)
    random_phi("phi-2", work.seed).save_pretrained(work.models / "phi")  # fp16, as microsoft/phi-2 ships
    tokenizer.save_pretrained(work.models / "phi")
    CLIPVisionModel(TINYCLIP_61M.config()).save_pretrained(work.models / "clip")
    return {"language_model": "random phi-2 shape", "vision_model": "random TinyCLIP-61M shape"}


def models_done(work: Work) -> bool:
    if work.smoke or work.recipe.built_here:
        return all((work.models / name / "config.json").is_file() for name in ("phi", "clip"))
    from huggingface_hub import snapshot_download

    try:
        for reference in (work.language_model, work.vision_model):
            snapshot_download(reference, local_files_only=True)
    except Exception:  # not (completely) in the Hub cache
        return False
    return True


# --- pretraining (part 1, --with-pretrain) -------------------------------------------------------


def run_pretrain(work: Work) -> dict[str, Any]:
    from training import shapes

    recipe = PretrainRecipe.load(work.recipe.pretrain)
    corpus = work.root / "data" / "pretrain-corpus"
    sources, tokenizer = recipe.sources, {}  # prepare_text's default tokenizer: phi-1.5's
    if sources == ["shapes"]:  # the tiny recipe: its own text and tokenizer
        text = work.root / "data" / "pretrain-text" / "shapes.txt"
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text("\n".join(shapes.language_texts(shapes.all_scenes()) * 20) + "\n")
        sources, tokenizer = [f"shapes={text}"], {"tokenizer": work.language_model}
    if not (corpus / CORPUS_META).is_file():
        prepare_text.prepare(
            sources,
            corpus,
            recipe.weights or None,
            held_out=0.05,
            max_tokens=recipe.max_tokens,
            seed=work.seed,
            **tokenizer,
        )
    fields = yaml.safe_load(Path(recipe.config).read_text()) | recipe.overrides
    fields |= {"data": str(corpus), "output_dir": str(work.root / "pretrain"), "seed": work.seed}
    if work.smoke:
        fields |= {"max_steps": 4, "warmup_steps": 1, "log_every": 1, "eval_every": 2, "save_every": 2}
    config = pretrain.PretrainConfig(**fields)
    config.resume = work.resume and (work.root / "pretrain" / CHECKPOINT).is_dir()
    return train(work, "training.pretrain", pretrain.run, config)


def pretrain_done(work: Work) -> bool:
    return (work.root / "pretrain" / "model" / "config.json").is_file() and (
        work.root / "pretrain" / "run.json"
    ).is_file()


# --- features, stage 1, stage 2 ------------------------------------------------------------------


def run_features(work: Work) -> dict[str, Any]:
    meta = cache_features.build_cache(
        work.data_files(),
        work.images,
        work.features,
        work.vision_model,
        work.recipe.vision_feature_layer,
        num_workers=0 if work.shapes_data else 4,
    )
    return {"images": meta["cached"], "failed": len(meta["failed"])}


def features_done(work: Work) -> bool:
    from training.feature_shards import FeatureCacheError, open_cache

    try:
        cache = open_cache(work.features, work.vision_model, work.recipe.vision_feature_layer, work.images)
        return all(image in cache or image in cache.failed for image in images_of(work.data_files()))
    except (FeatureCacheError, OSError, UsageError, ValueError):
        return False


def stage_paths(work: Work, stage: str) -> dict[str, Any]:
    training = "coco_captions_train2017.json" if stage == "stage1" else "instruct_train.json"
    held_out = "coco_captions_val2017.json" if stage == "stage1" else "instruct_val.json"
    paths = {
        "train_data": str(work.llava / training),
        "eval_data": str(work.llava / held_out),
        "image_folder": str(work.images),
        "feature_cache": str(work.features),
        "output_dir": str(work.root / stage),
        "seed": work.seed,
    }
    if stage == "stage1":
        paths |= {
            "language_model": work.language_model,
            "vision_model": work.vision_model,
            "vision_feature_layer": work.recipe.vision_feature_layer,
        }
    else:
        paths["stage1_weights"] = str(work.root / "stage1" / "weights")
    return paths


def run_stage(work: Work, stage: str) -> dict[str, Any]:
    module, run, config_class = {
        "stage1": ("training.stage1_align", stage1_align.run, stage1_align.Stage1Config),
        "stage2": ("training.stage2_instruct", stage2_instruct.run, stage2_instruct.Stage2Config),
    }[stage]
    config = config_class(**work.training_fields(stage), **stage_paths(work, stage))
    config.resume = work.resume and (work.root / stage / CHECKPOINT).is_dir()
    return train(work, module, run, config)


def train(work: Work, module: str, run: Callable[[Any], dict[str, Any]], config) -> dict[str, Any]:
    """One process here, or `accelerate launch` over every GPU (the stages' own multi-GPU path)."""
    if work.gpus.count <= 1:
        summary = run(config)
    else:
        path = config.save(work.root / "configs" / module.rsplit(".", 1)[-1])
        command = ["accelerate", "launch", "--num_processes", str(work.gpus.count), "-m", module]
        subprocess.run([*command, "--config", str(path)], check=True)
        summary = json.loads((Path(config.output_dir) / "run.json").read_text())
    result = {key: summary[key] for key in ("steps", "final_train_loss", "final_eval_loss") if key in summary}
    if summary.get("steps"):
        result["seconds_per_step"] = round(summary["seconds"] / summary["steps"], 3)
    return result


def weights_done(folder: Path, adapter: bool | None = None) -> bool:
    try:
        manifest = Manifest.load(folder)
    except (ManifestError, OSError, ValueError):
        return False
    return adapter is None or manifest.adapter == adapter


def space_weights_done(work: Work) -> bool:
    folder = work.root / "weights"
    return weights_done(folder, adapter=False) and saved_source(folder / INT8_DIR) == int8_source(
        folder, Manifest.load(folder)
    )


def trained(work: Work, stage: str) -> bool:
    return weights_done(work.root / stage / "weights") and (work.root / stage / "run.json").is_file()


# --- evaluation, the Space's weights, GGUF, the Hub -----------------------------------------------


def run_evaluate(work: Work) -> dict[str, Any]:
    settings, weights = work.evaluate_settings, work.root / "stage2" / "weights"
    others = [benchmark for benchmark in settings["benchmarks"] if benchmark != "pope"]
    if others:
        raise UsageError(f"refresh fetches POPE's data only; run training.evaluate --benchmark {others[0]} yourself")
    out = work.root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_for_evaluation(weights)  # once, for the held-out split and the benchmarks
    report = evaluate.evaluate(
        weights,
        work.llava / "instruct_val.json",
        work.images,
        limit=settings["held_out_limit"],
        max_new_tokens=settings["max_new_tokens"],
        loaded=loaded,
    )
    (out / "held_out.json").write_text(json.dumps(report, indent=1) + "\n")
    metrics = {"held_out_loss": report["loss"], "exact_match": report["exact_match"]}
    metrics["contains_match"] = report["contains_match"]
    if "pope" in settings["benchmarks"]:
        scores = evaluate.run_benchmark(
            "pope",
            weights,
            [work.pope],
            work.images,
            limit=settings["benchmark_limit"],
            max_new_tokens=settings["max_new_tokens"],
            loaded=loaded,
        )
        (out / "pope.json").write_text(json.dumps(scores, indent=1) + "\n")
        metrics["pope_f1"] = scores["scores"].get("average_f1")
    return metrics


def evaluate_done(work: Work) -> bool:
    names = ["held_out", *work.evaluate_settings["benchmarks"]]
    try:
        return all(json.loads((work.root / "eval" / f"{name}.json").read_text()) for name in names)
    except (OSError, ValueError):
        return False


def run_weights(work: Work) -> dict[str, Any]:
    """The Space's weights: stage 2's adapter merged (no peft at start-up), its int8 language model (what the
    app serves by default, so a Space that starts from an empty disk loads it instead of quantizing), a card
    and the evaluation."""
    out = work.root / "weights"
    merge_adapter.merge(work.root / "stage2" / "weights", out, getattr(torch, work.recipe.merged_dtype))
    int8 = load_weights(out, precision=Precision.INT8).model.language_model
    save_int8(int8, out / INT8_DIR, int8_source(out, Manifest.load(out)))
    del int8
    for report in (work.root / "eval").glob("*.json"):
        shutil.copy2(report, out / f"eval-{report.name}")
    datasets = [*COCO_DATASETS, *INSTRUCT_DATASETS]
    (out / "README.md").write_text(weights_card(out, work.metrics.get("evaluate"), datasets))
    if work.space_weights:
        staging = work.space_weights.with_name(f".{work.space_weights.name}.refresh")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(out, staging)
        replace_folder(staging, work.space_weights)
    return {"folder": str(work.space_weights or out)}


def run_gguf(work: Work) -> dict[str, Any]:
    exported = export(work.root / "weights", work.root / "gguf", work.recipe.gguf)
    return {"language_model": exported.language_model.name, "mmproj": exported.mmproj and exported.mmproj.name}


def gguf_done(work: Work) -> bool:
    folder = work.root / "gguf"
    return (folder / "README.md").is_file() and (folder / f"language-model-{work.recipe.gguf}.gguf").is_file()


def products_to_push(work: Work, with_pretrain: bool) -> dict[str, Path]:
    """Hub repo → local folder, for OWNER/PREFIX: PREFIX (the Space's weights), -GGUF, -stage1, -stage2."""
    prefix = work.push_to_hub
    products = {prefix: work.root / "weights", f"{prefix}-stage1": work.root / "stage1" / "weights"}
    products[f"{prefix}-stage2"] = work.root / "stage2" / "weights"
    if work.recipe.gguf:
        products[f"{prefix}-GGUF"] = work.root / "gguf"
    if with_pretrain:
        products[f"{prefix}-pretrain"] = work.root / "pretrain" / "model"
    return products


def run_push(work: Work, with_pretrain: bool) -> dict[str, Any]:
    urls = {}
    for repo, folder in products_to_push(work, with_pretrain).items():
        urls[repo] = push_folder(folder, repo, private=work.private, log=work.log)
    return urls
