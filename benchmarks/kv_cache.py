"""KV-cached generation against the original project's decoding (a full forward per new token).

Random weights of the chosen shape, a prompt of 49 image embeddings + 40 text tokens, greedy answers.
Both methods run in the same process on the same weights; the table reports times, the speed-up, and
whether the two produced the same tokens (a fast path that changes the answer does not count).

    python benchmarks/kv_cache.py --size phi-2 --new-tokens 64   # the real shape: ~11 GB in fp32
    python benchmarks/kv_cache.py                                # a small shape, about a minute
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import PhiConfig, PhiForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.config import GenerationOptions
from inference.model import MultimodalPhi
from inference.prompt import IMAGE_PLACEHOLDER_ID

SIZES = {
    # phi-2 and phi-1.5 as published; "small" keeps their structure at a size that runs in seconds.
    "phi-2": dict(
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=32,
        num_attention_heads=32,
        partial_rotary_factor=0.4,
    ),
    "phi-1.5": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        partial_rotary_factor=0.5,
    ),
    "small": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, partial_rotary_factor=0.5
    ),
}
IMAGE_TOKENS = 49  # TinyCLIP's 7 × 7 patches
PROMPT_TEXT_TOKENS = 40  # a system line and a short question


def build(size: str, dtype: torch.dtype) -> MultimodalPhi:
    torch.manual_seed(0)
    config = PhiConfig(vocab_size=51200, **SIZES[size])
    language_model = PhiForCausalLM(config).to(dtype).eval()
    # Vision tower and projector are not timed here: the image arrives as ready embeddings.
    return MultimodalPhi(vision_tower=None, projector=None, language_model=language_model, eos_token_id=50256)


def timed(function) -> tuple[float, list[int]]:
    start = time.perf_counter()
    tokens = function()
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (a CPU Basic Space has 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = build(args.size, getattr(torch, args.dtype))
    width = model.language_model.config.hidden_size
    image_embeds = torch.randn(1, IMAGE_TOKENS, width, dtype=model.embedding_dtype) * 0.02
    prompt = [IMAGE_PLACEHOLDER_ID, *torch.randint(0, 50000, (PROMPT_TEXT_TOKENS,)).tolist()]
    # Random weights never emit EOS on purpose; if one does, both methods stop at the same place.
    options = GenerationOptions(max_new_tokens=args.new_tokens)

    model.generate(prompt, image_embeds, GenerationOptions(max_new_tokens=2))  # warm-up
    cached_s, cached = timed(lambda: model.generate(prompt, image_embeds, options))
    full_s, full = timed(lambda: model.greedy_without_cache(prompt, image_embeds, args.new_tokens))

    parameters = sum(p.numel() for p in model.language_model.parameters()) / 1e9
    print(f"\n{args.size} ({parameters:.2f}B parameters, {args.dtype}, {args.threads} threads), ", end="")
    print(f"prompt {IMAGE_TOKENS} image + {PROMPT_TEXT_TOKENS} text tokens, {len(cached)} new tokens\n")
    print("| method | answer time | tokens/s | speed-up |\n|---|---|---|---|")
    print(f"| original: full recompute per token | {full_s:.2f} s | {len(full) / full_s:.2f} | 1.0× |")
    print(f"| KV cache (`generate`) | {cached_s:.2f} s | {len(cached) / cached_s:.2f} | {full_s / cached_s:.1f}× |")
    print(f"\nsame greedy tokens: {cached == full}")


if __name__ == "__main__":
    main()
