"""Stage 1 end to end on tiny models: COCO-format data → preparation → feature cache → training → weights."""

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from inference import Assistant, GenerationOptions, Manifest, TemplateName, tiny
from inference.cli import UsageError
from inference.precision import Precision
from inference.vision import VisionTower, load_image, preprocess
from tests.kit import free_port, make_shape_image, run_killed, with_phi2_dropout
from training import cache_features, hub_upload, prepare_coco, stage1_align
from training.checkpoint import CHECKPOINT, COMPLETE, OLD, STAGING, trainable_checksum
from training.data import Collator, load_examples
from training.feature_shards import FeatureCache, FeatureCacheError, open_cache
from training.shapes import warm_up_language_model
from training.stage1_align import Stage1Config

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "yellow"]
SIDES = {"left": 0.3, "right": 0.7}


def captions(colour: str, side: str) -> list[str]:
    return [f"A {colour} circle on the {side}.", f"A {colour} shape."]


def coco_split(root: Path, split: str, count: int, first_id: int) -> None:
    """A COCO captions file in the real format, with generated images of a coloured shape."""
    folder = root / f"{split}2017"
    folder.mkdir(parents=True)
    images, annotations = [], []
    for number in range(count):
        image_id = first_id + number
        colour, side = COLOURS[number % 4], list(SIDES)[number // 4 % 2]
        name = f"{image_id:012d}.jpg"
        image = make_shape_image("white", size=(96, 96))
        x = int(96 * SIDES[side])
        image.paste(make_shape_image(colour, size=(40, 40)), (x - 20, 28))
        image.save(folder / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": 96, "height": 96})
        for caption_number, caption in enumerate(captions(colour, side)):
            annotations.append({"id": image_id * 10 + caption_number, "image_id": image_id, "caption": caption})
    annotation_folder = root / "annotations"
    annotation_folder.mkdir(exist_ok=True)
    data = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    (annotation_folder / f"captions_{split}2017.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    coco_split(root, "train", 32, 1000)
    coco_split(root, "val", 8, 2000)
    (root / "train2017" / f"{1000:012d}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # corrupt
    (root / "train2017" / f"{1001:012d}.jpg").unlink()  # missing
    return root


@pytest.fixture(scope="module")
def caption_lm(phi_dir, tmp_path_factory) -> Path:
    """The tiny Phi after learning to read colour and side from its context and to caption with them.

    phi-2 arrives pretrained: it can use what its context says. A random tiny LM cannot, and a frozen
    one would leave the projector nothing to align to; this one learned "red left: A red circle on the
    left." so that stage 1 has to teach the projector to say "red left" in embeddings.
    """
    texts = [
        f"{colour} {side}: {caption}" for colour in COLOURS for side in SIDES for caption in captions(colour, side)
    ]
    return warm_up_language_model(phi_dir, tmp_path_factory.mktemp("caption-lm"), texts, steps=600)


@pytest.fixture(scope="module")
def prepared(coco) -> dict:
    return prepare_coco.prepare(coco, coco / "llava")


def data_files(coco: Path) -> list[Path]:
    return [coco / "llava" / f"coco_captions_{split}2017.json" for split in ("train", "val")]


@pytest.fixture(scope="module")
def features(coco, prepared, clip_dir) -> Path:
    out = coco / "features"
    cache_features.build_cache(data_files(coco), coco, out, str(clip_dir), -2, shard_size=16, num_workers=0)
    return out


def stage1_config(coco: Path, caption_lm, clip_dir, output: Path, **settings) -> Stage1Config:
    train, held_out = data_files(coco)
    defaults = dict(batch_size=4, global_batch_size=8, lr=1e-2, warmup_ratio=0.1, log_every=1, eval_every=10)
    defaults |= dict(save_every=10, eval_batches=0, samples=2, num_workers=0)
    return Stage1Config(
        train_data=str(train),
        eval_data=str(held_out),
        image_folder=str(coco),
        language_model=str(caption_lm),
        vision_model=str(clip_dir),
        output_dir=str(output),
        **(defaults | settings),
    )


def stage1_args(config: Stage1Config) -> list[str]:
    """The command-line flags of a config (what a user types for it)."""
    return config.command_line("training.stage1_align").split()[3:]


def test_preparation_counts_and_skips_bad_images(prepared, coco):
    assert prepared["train"]["images missing"] == 1 and prepared["train"]["images corrupt"] == 1
    assert prepared["train"]["captions"] == 30 * 2 and prepared["train"]["images"] == 30
    assert prepared["val"]["captions"] == 16
    examples, malformed = load_examples(coco / "llava" / "coco_captions_train2017.json")
    assert len(examples) == 60 and not malformed
    assert examples[0].conversation.turns[0].answer.startswith("A ") and examples[0].image.startswith("train2017/")


def test_feature_cache_holds_every_readable_image(features, coco):
    cache = FeatureCache(features)
    assert len(cache) == 38 and not cache.failed
    assert cache.meta["shape"] == [49, 16]
    sample = cache["val2017/000000002000.jpg"]
    assert sample.shape == (49, 16) and str(sample.dtype) == "float16"
    # A rerun finds every shard done and rewrites nothing.
    before = {path: path.stat().st_mtime_ns for path in features.glob("features-*.npy")}
    train, held_out = data_files(coco)
    cache_features.build_cache(
        [held_out, train], coco, features, cache.meta["vision_model"], -2, shard_size=16, num_workers=0
    )
    assert {path: path.stat().st_mtime_ns for path in features.glob("features-*.npy")} == before


def test_feature_cache_knows_its_model_layer_and_images(coco, prepared, clip_dir, tmp_path):
    """Changed images, a model folder whose weights changed, or another layer are refused; a rerun fixes them."""
    images, tower = tmp_path / "images", tmp_path / "tower"
    shutil.copytree(coco / "val2017", images / "val2017")
    shutil.copytree(clip_dir, tower)
    held_out, out = data_files(coco)[1], tmp_path / "features"
    (out / "features-00000-orphan0.npy").parent.mkdir()
    (out / "features-00000-orphan0.npy").write_bytes(b"left by a run killed before its listing")

    def build():
        return cache_features.build_cache([held_out], images, out, str(tower), -2, shard_size=4, num_workers=0)

    build()
    assert not (out / "features-00000-orphan0.npy").exists()
    open_cache(out, str(tower), -2, images)  # matches
    with pytest.raises(FeatureCacheError, match=r"layer -2 .* uses .* layer -1"):
        open_cache(out, str(tower), -1, images)

    replaced = images / "val2017" / f"{2005:012d}.jpg"  # row 1 of the second shard
    make_shape_image("blue", size=(96, 96)).save(replaced, quality=95)
    with pytest.raises(FeatureCacheError, match=r"1 images in .* changed since .*: rebuild it with"):
        open_cache(out, str(tower), -2, images)
    arrays = sorted(path.name for path in out.glob("features-*.npy"))
    build()
    after = sorted(path.name for path in out.glob("features-*.npy"))
    assert after[0] == arrays[0] and after[1] != arrays[1]  # only the shard holding the changed image was redone
    fresh = VisionTower.from_pretrained(str(tower), -2)(preprocess([load_image(replaced)], 224))[0]
    cache = open_cache(out, str(tower), -2, images)
    torch.testing.assert_close(
        torch.from_numpy(cache["val2017/" + replaced.name].astype("float32")), fresh, atol=2e-2, rtol=1e-2
    )

    broken = images / "val2017" / f"{2002:012d}.jpg"  # unreadable when cached: left out of training
    broken.write_bytes(b"not an image")
    assert "val2017/" + broken.name in build()["failed"]
    make_shape_image("green", size=(96, 96)).save(broken, quality=95)  # repaired
    with pytest.raises(FeatureCacheError, match="changed since"):
        open_cache(out, str(tower), -2, images)
    assert not build()["failed"]  # the rebuild reads it this time
    assert "val2017/" + broken.name in open_cache(out, str(tower), -2, images)

    tiny.build_tiny_clip(tower, seed=1)  # the same path (or Hub id) now holds other weights
    with pytest.raises(FeatureCacheError, match="fingerprint"):
        open_cache(out, str(tower), -2, images)


def test_cached_and_on_the_fly_features_give_the_same_loss(features, coco, caption_lm, clip_dir, tmp_path):
    model, tokenizer, _ = stage1_align.build(stage1_config(coco, caption_lm, clip_dir, tmp_path), "no")
    examples, _ = load_examples(coco / "llava" / "coco_captions_val2017.json")
    cached = collator(tokenizer, coco, FeatureCache(features))(examples[:4])
    on_the_fly = collator(tokenizer, coco)(examples[:4])
    assert "image_features" in cached and "pixel_values" in on_the_fly
    model.eval()
    with torch.no_grad():
        loss_cached, loss_live = model(**cached).loss, model(**on_the_fly).loss
    torch.testing.assert_close(loss_cached, loss_live, rtol=1e-3, atol=1e-3)  # fp16 storage of the features


def collator(tokenizer, coco: Path, cache: FeatureCache | None = None) -> Collator:
    """Captions of at most 128 positions, 49 of them the image's, over tiny CLIP's 224 px images."""
    return Collator(tokenizer, TemplateName.PLAIN, 128, 49, 224, coco, cache)


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def training_set_loss(model, tokenizer, coco: Path, features: Path) -> float:
    examples, _ = load_examples(coco / "llava" / "coco_captions_train2017.json")
    batch = collator(tokenizer, coco, FeatureCache(features))(examples[::4])
    with torch.no_grad():
        return model.eval()(**batch).loss.item()


def test_stage1_trains_the_projector_and_writes_servable_weights(features, coco, caption_lm, clip_dir, tmp_path):
    output = tmp_path / "run"
    config = stage1_config(coco, caption_lm, clip_dir, output, feature_cache=str(features), max_steps=60, lr=3e-2)
    summary = stage1_align.run(replace(config, eval_every=20))
    assert summary["steps"] == 60 and summary["world_size"] == 1
    rows = read_log(output / "log.csv")
    assert len([row for row in rows if row["train_loss"]]) == 60
    evals = [float(row["eval_loss"]) for row in rows if row["eval_loss"]]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert (output / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all("generated" in sample for sample in samples)
    assert (output / "checkpoint" / "trainer.pt").is_file() and (output / "config.yaml").is_file()

    # Loss on a fixed slice of the training set: the same initial projector (same seed) before, the trained one after.
    set_seed(config.seed)
    model, tokenizer, _ = stage1_align.build(config, "no")
    before = training_set_loss(model, tokenizer, coco, features)
    model.projector.load_state_dict(load_file(output / "weights" / "projector.safetensors"))
    after = training_set_loss(model, tokenizer, coco, features)
    assert after < 0.75 * before, (before, after)

    manifest = Manifest.load(output / "weights")
    assert manifest.template is TemplateName.PLAIN and not manifest.adapter
    assert manifest.training["steps"] == 60
    assistant = Assistant.load(output / "weights", whisper_model=None, precision=Precision.FP32)
    options = GenerationOptions(max_new_tokens=8)
    reply = list(assistant.chat([], make_shape_image("red"), text="Describe.", options=options))
    assert reply[-1].answer


def test_a_run_with_dropout_killed_anywhere_resumes_bit_for_bit(features, coco, caption_lm, clip_dir, tmp_path):
    """phi-2's dropout on; SIGKILL inside a save, between its renames, while deleting, mid-step, and at random."""
    lm = with_phi2_dropout(caption_lm, tmp_path / "lm")
    settings = dict(feature_cache=str(features), max_steps=12, save_every=1, eval_every=4, samples=1)
    command = [sys.executable, "-m", "training.stage1_align"]
    started = time.monotonic()
    assert run_killed([*command, *stage1_args(stage1_config(coco, lm, clip_dir, tmp_path / "whole", **settings))]) == 0
    seconds = time.monotonic() - started

    output = tmp_path / "killed"
    config = stage1_config(coco, lm, clip_dir, output, **settings)
    resume = [*command, *stage1_args(replace(config, resume=True))]
    assert run_killed([*command, *stage1_args(config)], "mid-write@3") == -signal.SIGKILL
    assert (output / STAGING).is_dir() and not (output / STAGING / COMPLETE).exists()
    assert run_killed(resume, "between-renames") == -signal.SIGKILL
    assert not (output / CHECKPOINT).exists() and (output / OLD / COMPLETE).exists()
    assert run_killed(resume, "deleting-old") == -signal.SIGKILL
    assert (output / CHECKPOINT).is_dir() and (output / OLD).is_dir()  # half deleted: the next save fails on it
    assert run_killed(resume, "train-step@3") == -signal.SIGKILL  # after a micro-batch's backward
    moments = random.Random(0)
    outcomes = [run_killed(resume, kill_after=moments.uniform(0.6, 0.9) * seconds) for _ in range(2)]
    while run_killed(resume) != 0:
        pass
    print(f"random kills: {outcomes} (-9 = killed, 0 = finished first)")

    whole = load_file(tmp_path / "whole" / "weights" / "projector.safetensors")
    resumed = load_file(output / "weights" / "projector.safetensors")
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)

    # The log reads as one run: the rows of steps redone after each kill were dropped, losses and lr agree.
    def losses(path):
        return [(row["step"], row["train_loss"], row["eval_loss"], row["lr"]) for row in read_log(path / "log.csv")]

    assert losses(output) == losses(tmp_path / "whole")


def test_two_processes_train_one_projector(features, coco, caption_lm, clip_dir, tmp_path):
    output = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "training.stage1_align",
        *stage1_args(stage1_config(coco, caption_lm, clip_dir, output, feature_cache=str(features), max_steps=4)),
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "run.json").read_text())
    assert summary["world_size"] == 2
    # Each rank took its own half of every global batch of 8: 4 steps × 4 samples.
    assert summary["samples_per_rank"] == [16, 16]
    checkpoint = torch.load(output / "checkpoint" / "trainer.pt", weights_only=False)
    assert summary["trainable_checksum_per_rank"] == [trainable_checksum(checkpoint["trainable"])] * 2
    saved = load_file(output / "weights" / "projector.safetensors")
    for name, tensor in saved.items():
        assert torch.equal(tensor, checkpoint["trainable"][f"projector.{name}"])


@pytest.mark.gpu
def test_an_fp16_run_killed_mid_step_resumes_bit_for_bit(features, coco, caption_lm, clip_dir, tmp_path):
    """fp16 on CUDA: the loss scaler's state travels in the checkpoint (accelerate makes none on the CPU)."""
    lm = with_phi2_dropout(caption_lm, tmp_path / "lm")
    settings = dict(feature_cache=str(features), max_steps=8, save_every=2, mixed_precision="fp16")
    command = [sys.executable, "-m", "training.stage1_align"]
    assert run_killed([*command, *stage1_args(stage1_config(coco, lm, clip_dir, tmp_path / "whole", **settings))]) == 0
    config = stage1_config(coco, lm, clip_dir, tmp_path / "killed", **settings)
    assert run_killed([*command, *stage1_args(config)], "train-step@11") == -signal.SIGKILL  # in step 6
    assert "scaler" in torch.load(tmp_path / "killed" / CHECKPOINT / "trainer.pt", weights_only=True)
    assert run_killed([*command, *stage1_args(replace(config, resume=True))]) == 0
    whole = load_file(tmp_path / "whole" / "weights" / "projector.safetensors")
    resumed = load_file(tmp_path / "killed" / "weights" / "projector.safetensors")
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)


def test_a_run_resumes_on_another_number_of_processes(features, coco, caption_lm, clip_dir, tmp_path):
    """Killed on one process, resumed on two: same samples, same global batch; equal up to rounding, not bit-exact."""
    settings = dict(feature_cache=str(features), max_steps=6, save_every=3)
    whole = stage1_align.run(stage1_config(coco, caption_lm, clip_dir, tmp_path / "whole", **settings))
    output = tmp_path / "moved"
    config = stage1_config(coco, caption_lm, clip_dir, output, **settings)
    assert (
        run_killed([sys.executable, "-m", "training.stage1_align", *stage1_args(config)], "train-step@7") == -9
    )  # in step 4
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "training.stage1_align", *stage1_args(replace(config, resume=True)),
    ]  # fmt: skip
    assert run_killed(command) == 0
    summary = json.loads((output / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    resumed = load_file(output / "weights" / "projector.safetensors")
    expected = load_file(tmp_path / "whole" / "weights" / "projector.safetensors")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-4, atol=1e-5)
    trained = [float(row["train_loss"]) for row in read_log(output / "log.csv") if row["train_loss"]]
    assert len(trained) == 6 and trained[-1] == pytest.approx(whole["final_train_loss"], rel=1e-4)


def test_a_position_budget_past_the_language_models_context_is_refused(features, coco, caption_lm, clip_dir, tmp_path):
    config = stage1_config(coco, caption_lm, clip_dir, tmp_path, feature_cache=str(features), max_length=4096)
    with pytest.raises(UsageError, match="--max-length 4096 is over the language model's context of 2048"):
        stage1_align.run(config)


def test_push_to_hub_uploads_each_checkpoint_and_the_complete_final_folder(
    features, coco, caption_lm, clip_dir, tmp_path, monkeypatch
):
    commits = []

    class FakeHub:
        def create_repo(self, repo_id, **kwargs):
            assert kwargs["private"] is True

        def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
            files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            commits.append((repo_id, commit_message, files))

    monkeypatch.setattr(hub_upload, "HfApi", FakeHub)
    output = tmp_path / "run"
    settings = dict(feature_cache=str(features), max_steps=12, save_every=5, push_to_hub="me/stage1")
    config = stage1_config(coco, caption_lm, clip_dir, output, hub_private=True, push_checkpoints=True, **settings)
    stage1_align.main(stage1_args(config))  # the command line, as a user would type it
    assert [message for _, message, _ in commits] == [
        "Checkpoint at step 5", "Checkpoint at step 10", "Final weights at step 12"
    ]  # fmt: skip
    final = commits[-1][2]
    for name in ("manifest.json", "projector.safetensors", "config.yaml", "log.csv", "loss.png", "README.md"):
        assert name in final
    assert final == sorted(
        str(p.relative_to(output / "weights")) for p in (output / "weights").rglob("*") if p.is_file()
    )
    card = (output / "weights" / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "stage1_align" in card and "--push-to-hub" in card
