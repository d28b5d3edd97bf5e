"""Whisper model sizes on the CPU: time to transcribe a short question, to pick the default size.

Random weights of each size's real shape (no download), one 30 s window as whisper always processes,
and a fixed answer length, so the sizes are compared on equal work in one run.

    python benchmarks/whisper_sizes.py --tokens 20 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import whisper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.dimensions import WHISPER_SIZES


def build(size: str) -> whisper.model.Whisper:
    torch.manual_seed(0)
    return whisper.model.Whisper(WHISPER_SIZES[size].dimensions()).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20, help="decoded tokens (a short spoken question)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    audio = np.random.default_rng(0).normal(0, 0.1, whisper.audio.SAMPLE_RATE * 3).astype(np.float32)
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)))
    options = whisper.DecodingOptions(language="en", fp16=False, without_timestamps=True, sample_len=args.tokens)
    rows = []
    for size in WHISPER_SIZES:
        model = build(size)
        whisper.decode(model, mel, options)  # warm-up
        start = time.perf_counter()
        result = whisper.decode(model, mel, options)
        seconds = time.perf_counter() - start
        parameters = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append((size, parameters, seconds, len(result.tokens)))

    base = dict((size, seconds) for size, _, seconds, _ in rows)["base.en"]
    print(f"\n3 s of audio (one 30 s window), {args.threads} threads, up to {args.tokens} tokens\n")
    print("| size | parameters | time | tokens | vs base.en |\n|---|---|---|---|---|")
    for size, parameters, seconds, tokens in rows:
        print(f"| {size} | {parameters:.0f}M | {seconds:.2f} s | {tokens} | {seconds / base:.2f}× |")


if __name__ == "__main__":
    main()
