"""The served int8 model's decode speed through the app's batcher, with the layers that read one input computed as
one product (as served: `inference.int8_linear.SharedInput`) and apart, for 1 and 8 answers decoded together;
with `--llama-cpp`, the llama.cpp backend (Q8_0) through the same batcher beside them.

    python benchmarks/served_decode.py --weights FOLDER   # a weights folder, e.g. the phi-2-shaped stand-in
                                                          # benchmarks/cpu_inference.py builds (about 8 min)
    python benchmarks/served_decode.py --weights FOLDER --llama-cpp [--gguf FOLDER]
    python benchmarks/served_decode.py --demo             # tiny random models: the script works

Both int8 arrangements are one int8 file loaded twice (`load_int8(share_inputs=...)`), so they hold the same
numbers and differ only in how the products are run; their greedy answers are checked equal (llama.cpp's
Q8_0 rounds otherwise, so its answers may differ). llama.cpp's GGUF file is `--gguf`'s, else exported
once into the cache folder as the app does. Each answer is the served
prompt shape (system prompt, template, the image's positions and a question), its own random image and a greedy
answer of `--tokens`. Decode speed is taken where every row is decoding: from the moment the last of them has
its first token to the moment the first of them has its last, tokens arrived in that window over its length.
Arrangements take turns, `--rounds` rounds; medians. The table is printed and written to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.backends.llamacpp import load_llamacpp
from inference.backends.pytorch import TorchBackend, load_torch
from inference.int8_files import load_int8
from inference.measuring import (
    AVX2_KERNELS,
    RESULTS,
    bandwidth_gb_s,
    cpu_description,
    decode_rate,
    served_prompts,
    write_section,
)
from inference.precision import Precision
from inference.serving_cache import int8_location


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="weights folder (the phi-2-shaped stand-in, or real weights)")
    parser.add_argument("--demo", action="store_true", help="tiny random models built here (checks the script)")
    parser.add_argument("--cache", type=Path, help="int8 and GGUF cache folder (default: a temporary one)")
    parser.add_argument("--llama-cpp", action="store_true", help="the llama.cpp backend too (Q8_0)")
    parser.add_argument("--gguf", type=Path, help="its GGUF folder (default: exported once into --cache)")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per answer")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the arrangements take turns in each")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU Basic has 2 vCPUs)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file the table is written to")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        if args.demo:
            from inference.tiny import build_demo_weights

            args.weights, _ = build_demo_weights(Path(scratch) / "demo")
        elif args.weights is None:
            parser.error("give --weights, or --demo")
        cache = args.cache or Path(scratch)
        loaded = load_torch(args.weights, Precision.INT8, cache / "int8")
        model = loaded.backend.model
        saved = int8_location(args.weights, loaded.manifest, cache / "int8")
        apart = loaded.backend.call(lambda: load_int8(saved, False))
        language_models = {"one product (served)": model.language_model, "apart": apart}
        # Every computation on the one thread that loaded the model, as served (`inference.batching`).
        batcher = loaded.backend.batcher
        backends = {name: lambda: TorchBackend(model, Precision.INT8, batcher=batcher) for name in language_models}
        if args.llama_cpp or args.demo:
            llama = load_llamacpp(args.weights, args.gguf, args.threads, cache / "gguf").backend
            backends[llama.describe()] = lambda: llama  # one context: its sequences keep what they computed
        speeds: dict[tuple[str, int], list[float]] = {}
        answers: dict[tuple[str, int], list] = {}
        reads = []  # in turn with the decodes: the memory's speed changes from one minute to the next
        for _ in range(args.rounds):
            reads.append(bandwidth_gb_s(args.threads))
            for rows in (1, 8):
                asked = served_prompts(loaded, rows)
                for name, backend in backends.items():
                    model.language_model = language_models.get(name, model.language_model)
                    speed, answers[name, rows] = decode_rate(backend(), asked, args.tokens)
                    speeds.setdefault((name, rows), []).append(speed)
    served_name = next(iter(language_models))
    same = all(answers[name, rows] == answers[served_name, rows] for name in language_models for rows in (1, 8))
    table = [{"arrangement": name, "rows": rows, "tok_s": statistics.median(s)} for (name, rows), s in speeds.items()]
    served = {row["rows"]: row["tok_s"] for row in table if row["arrangement"] == served_name}
    # One section per kernel class: a run with torch's kernels limited to AVX2 keeps the native run's.
    limited = any(os.environ.get(name) for name in AVX2_KERNELS)
    heading = f"### Served decode{', AVX2 kernels' if limited else ''}: shared-input products and backends"
    lines = [
        f"{heading} (served_decode.py, {time.strftime('%Y-%m-%d')})\n",
        f"{cpu_description()}, {args.threads} threads; {'tiny random models' if args.demo else args.weights}; "
        f"{args.tokens}-token greedy answers "
        f"through the app's batcher, medians of {args.rounds} rounds taken in turn; read bandwidth "
        f"{statistics.median(reads):.1f} GB/s ({min(reads):.1f}–{max(reads):.1f}, one read a round); "
        f"greedy answers equal in both int8 arrangements: {'yes' if same else 'NO'}; "
        f"the run took {time.perf_counter() - began:.0f} s.\n",
        "| arrangement | answers at once | decode tokens/s (all rows) | per answer | served ÷ this |",
        "|---|---|---|---|---|",
    ]
    for row in table:
        ratio = served[row["rows"]] / row["tok_s"]
        lines.append(
            f"| {row['arrangement']} | {row['rows']} | {row['tok_s']:.2f} | {row['tok_s'] / row['rows']:.2f} "
            f"| {ratio:.2f}× |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(text, heading, args.results)
    return table


if __name__ == "__main__":
    main()
