"""Stage-1 training step time: the original per-token loop, one teacher-forced forward, cached features.

Random weights: TinyCLIP's vision shape (ViT 640 wide, 12 layers, 32 px patches) and a Phi of the
chosen shape; the projector trains, everything else is frozen. Batch of 4 captions of COCO length on
640 × 480 images, as the original project used. All methods run in one process on the same weights.

    python benchmarks/stage1_step.py                 # a small Phi: about a minute on 2 CPU cores
    python benchmarks/stage1_step.py --size phi-2    # the real shape (needs ~30 GB of RAM in fp32)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import CLIPVisionModel, PhiForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.config import ProjectorConfig, ProjectorType
from inference.dimensions import GPT2_EOS_ID, PHI_SIZES, TINYCLIP_61M
from inference.model import MultimodalPhi
from inference.projector import build_projector
from inference.prompt import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from inference.vision import VisionTower, preprocess

IMAGE_TOKENS = TINYCLIP_61M.num_patches
BATCH = 4  # the original project's batch size
CAPTION_TOKENS = 14  # a typical COCO caption plus <|endoftext|>


def build(size: str) -> MultimodalPhi:
    torch.manual_seed(0)
    language_model = PhiForCausalLM(PHI_SIZES[size].config()).requires_grad_(False)
    tower = VisionTower(CLIPVisionModel(TINYCLIP_61M.config()), feature_layer=-2)
    config = ProjectorConfig(ProjectorType.LINEAR, tower.width, language_model.config.hidden_size)
    return MultimodalPhi(tower, build_projector(config), language_model, eos_token_id=GPT2_EOS_ID).train()


def per_token_loop(model: MultimodalPhi, images, captions: torch.Tensor) -> None:
    """The original project: one full forward over image + caption prefix for every caption token."""
    pixels = preprocess(images, model.vision_tower.image_size)
    image_embeds = model.encode_images(pixels)
    caption_embeds = model.language_model.get_input_embeddings()(captions)
    loss = 0.0
    for position in range(captions.shape[1]):
        embeds = torch.cat([image_embeds, caption_embeds[:, :position]], dim=1)
        logits = model.language_model(inputs_embeds=embeds, use_cache=False).logits[:, -1]
        loss = loss + F.cross_entropy(logits, captions[:, position])
    (loss / captions.shape[1]).backward()


def teacher_forced(model: MultimodalPhi, captions: torch.Tensor, **images) -> None:
    """This project: one forward with labels over the whole batch."""
    ids = [[*[IMAGE_PLACEHOLDER_ID] * IMAGE_TOKENS, *row] for row in captions.tolist()]
    labels = [[*[IGNORE_INDEX] * IMAGE_TOKENS, *row] for row in captions.tolist()]
    model(ids, labels, **images).loss.backward()


def timed(function, repeats: int) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=PHI_SIZES, default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = build(args.size)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(BATCH)]
    captions = torch.randint(0, 50000, (BATCH, CAPTION_TOKENS))
    with torch.no_grad():  # the cache: computed once, stored in fp16, read back
        cached = model.vision_tower(preprocess(images, model.vision_tower.image_size)).half().numpy()

    rows = [
        ("original: a forward per caption token", timed(lambda: per_token_loop(model, images, captions), args.repeats)),
        (
            "one teacher-forced forward, tower on the fly",
            timed(
                lambda: teacher_forced(model, captions, pixel_values=preprocess(images, TINYCLIP_61M.image_size)),
                args.repeats,
            ),
        ),
        (
            "one teacher-forced forward, cached features",
            timed(lambda: teacher_forced(model, captions, image_features=torch.from_numpy(cached)), args.repeats),
        ),
    ]
    parameters = sum(p.numel() for p in model.language_model.parameters()) / 1e9
    print(f"\n{args.size} ({parameters:.2f}B) + TinyCLIP-shaped tower, batch {BATCH} × {CAPTION_TOKENS} caption "
          f"tokens, 640×480 images, fp32, {args.threads} threads\n")  # fmt: skip
    print("| stage-1 step | time | vs original | vs on-the-fly |\n|---|---|---|---|")
    original, on_the_fly = rows[0][1], rows[1][1]
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} s | {original / seconds:.1f}× | {on_the_fly / seconds:.2f}× |")


if __name__ == "__main__":
    main()
