"""Stage-2 QLoRA step on phi-2's real shape: peak GPU memory and step time, with and without checkpointing.

Random weights of phi-2's shape are saved once to a temporary folder and loaded back through the
stage-2 code path (4-bit NF4, double quantisation, prepare_model_for_kbit_training, LoRA r 64 on the
original project's modules) — no internet needed. Batch 4 (the original project's) of 49 image
embeddings + 200 text tokens. Appends a table to benchmarks/RESULTS.md.

    python benchmarks/stage2_memory.py                       # on a CUDA machine, a few minutes
    python benchmarks/stage2_memory.py --size small --steps 2   # a CPU smoke run of the same path
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import CLIPVisionModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.config import ProjectorConfig, ProjectorType  # noqa: E402
from inference.dimensions import GPT2_EOS_ID, PHI_SIZES, TINYCLIP_61M  # noqa: E402
from inference.model import MultimodalPhi  # noqa: E402
from inference.projector import build_projector  # noqa: E402
from inference.prompt import IMAGE_PLACEHOLDER_ID  # noqa: E402
from inference.standins import random_phi  # noqa: E402
from inference.vision import VisionTower  # noqa: E402
from training.optim import resolve_precision  # noqa: E402
from training.stage2_instruct import Stage2Config, load_language_model  # noqa: E402

BATCH = 4
TEXT_TOKENS = 200  # a LLaVA-Instruct conversation turn or two
ORIGINAL_GPU_GB = 16  # the original project's V100


def measure(folder: Path, checkpointing: bool, steps: int, device: torch.device) -> tuple[float, float | None]:
    lora = dict(lora_r=64, lora_alpha=16, lora_dropout=0.1)  # the original project's LoRA
    config = Stage2Config(
        stage1_weights="-", train_data="-", image_folder="-", gradient_checkpointing=checkpointing, **lora
    )
    precision = resolve_precision("auto")
    language_model = load_language_model(str(folder), config, precision, device)
    tower = VisionTower(CLIPVisionModel(TINYCLIP_61M.config()), feature_layer=-2).to(device)
    width = language_model.config.hidden_size
    projector = build_projector(ProjectorConfig(ProjectorType.MLP2X_GELU, TINYCLIP_61M.hidden_size, width))
    model = MultimodalPhi(tower, projector.to(device), language_model, eos_token_id=GPT2_EOS_ID).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    image = [IMAGE_PLACEHOLDER_ID] * TINYCLIP_61M.num_patches
    ids = [[*image, *torch.randint(0, 50000, (TEXT_TOKENS,)).tolist()] for _ in range(BATCH)]
    pixels = torch.randn(BATCH, 3, 224, 224, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(ids, ids, pixel_values=pixels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    del model, language_model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return sum(times[1:]) / steps, peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=PHI_SIZES, default="phi-2")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        random_phi(args.size).save_pretrained(folder)
        rows = [
            (checkpointing, *measure(Path(folder), checkpointing, args.steps, device))
            for checkpointing in (False, True)
        ]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [
        f"\n## Stage 2 QLoRA step, {args.size} shape, batch {BATCH} × (49 + {TEXT_TOKENS}) — {name}, "
        f"{datetime.now(UTC):%Y-%m-%d}\n",
        "| gradient checkpointing | step time | peak GPU memory | vs the original's 16 GB V100 |",
        "|---|---|---|---|",
    ]
    for checkpointing, seconds, peak in rows:
        headroom = "n/a" if peak is None else f"{ORIGINAL_GPU_GB - peak:.1f} GB under"
        memory = "n/a (CPU)" if peak is None else f"{peak:.2f} GB"
        lines.append(f"| {'on' if checkpointing else 'off'} | {seconds:.2f} s | {memory} | {headroom} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if device.type == "cuda":
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as results:
            results.write(report)


if __name__ == "__main__":
    main()
