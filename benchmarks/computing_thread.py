"""One computing thread: decode speed through the app's batcher when the model was loaded on the batcher's own
thread, as served (`load_torch`: every computation on one thread), and when it was loaded on the main thread and is
decoded on the batcher's (as the app served before), 1 and 8 answers at once.

    python benchmarks/computing_thread.py --weights FOLDER   # a weights folder, e.g. the phi-2-shaped stand-in
                                                             # benchmarks/cpu_inference.py builds (about 6 min)
    python benchmarks/computing_thread.py --demo             # tiny random models: the script works

torch's OpenMP runtime keeps a pool of workers for each thread that has run a parallel operation, and lets idle
workers spin only while the process has no more of them than CPUs (`inference.batching`). A pool on the loading
thread and another on the computing one are already too many on 2 cores. Each layout runs in a fresh process (pools
last as long as their threads), the layouts take turns, `--rounds` rounds; medians. Both load the same int8 file,
so their greedy answers are checked equal. Decode speed is taken where every row decodes (`decode_rate`). The table
is printed and written to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.backends import LoadedBackend
from inference.backends.pytorch import TorchBackend, load_torch
from inference.config import Manifest
from inference.hub import resolve_weights
from inference.loading import load_weights
from inference.measuring import RESULTS, cpu_description, decode_rate, served_prompts, write_section
from inference.precision import Precision
from inference.serving_cache import int8_location

SERVED = "loaded and decoded on the batcher's thread (served)"
BEFORE = "loaded on the main thread, decoded on the batcher's"
ROWS = (1, 8)


def measure(layout: str, weights: Path, cache: Path, tokens: int, threads: int) -> dict:
    """In this process: load `weights` as `layout` says, then decode tokens/s and answers for 1 and 8 rows."""
    torch.set_num_threads(threads)
    if layout == SERVED:
        loaded = load_torch(weights, Precision.INT8, cache)
    else:
        folder = resolve_weights(weights)
        model = load_weights(
            folder, precision=Precision.INT8, int8_path=int8_location(folder, Manifest.load(folder), cache)
        )
        loaded = LoadedBackend(TorchBackend(model.model, Precision.INT8), model.tokenizer, model.manifest)
    measured = {}
    for rows in ROWS if tokens else ():  # none: loaded only (the int8 file saved)
        speed, answers = decode_rate(loaded.backend, served_prompts(loaded, rows), tokens)
        measured[rows] = {"tok_s": speed, "answers": answers}
    return measured


def in_fresh_process(layout: str, weights: Path, cache: Path, tokens: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", layout, "--weights", str(weights), "--cache", str(cache)]
    command += ["--tokens", str(tokens), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{layout} failed:\n{result.stderr[-3000:]}")
    output = result.stdout
    return {int(rows): value for rows, value in json.loads(output.splitlines()[-1]).items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="weights folder (the phi-2-shaped stand-in, or real weights)")
    parser.add_argument("--demo", action="store_true", help="tiny random models built here (checks the script)")
    parser.add_argument("--cache", type=Path, help="int8 cache folder (default: a temporary one)")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per answer")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the layouts take turns in each")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU Basic has 2 vCPUs)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file the table is written to")
    parser.add_argument("--child", choices=[SERVED, BEFORE], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.weights, args.cache, args.tokens, args.threads)))
        return []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        if args.demo:
            from inference.tiny import build_demo_weights

            args.weights, _ = build_demo_weights(Path(scratch) / "demo")
        elif args.weights is None:
            parser.error("give --weights, or --demo")
        cache = args.cache or Path(scratch) / "int8"
        in_fresh_process(SERVED, args.weights, cache, 0, args.threads)  # saves the int8 file both layouts load
        runs: dict[str, list[dict]] = {SERVED: [], BEFORE: []}
        for _ in range(args.rounds):
            for layout, measured in runs.items():
                measured.append(in_fresh_process(layout, args.weights, cache, args.tokens, args.threads))
    same = all(
        run[rows]["answers"] == runs[SERVED][0][rows]["answers"] for r in runs.values() for run in r for rows in ROWS
    )
    table = [
        {"layout": layout, "rows": rows, "tok_s": statistics.median(run[rows]["tok_s"] for run in measured)}
        for layout, measured in runs.items()
        for rows in ROWS
    ]
    served = {row["rows"]: row["tok_s"] for row in table if row["layout"] == SERVED}
    heading = "### One computing thread"
    lines = [
        f"{heading} (computing_thread.py, {time.strftime('%Y-%m-%d')})\n",
        f"{cpu_description()}, {args.threads} threads; {'tiny random models' if args.demo else args.weights}, int8; "
        f"{args.tokens}-token greedy answers through the app's batcher, each layout in a fresh process, medians of "
        f"{args.rounds} rounds taken in turn; greedy answers equal in both layouts: {'yes' if same else 'NO'}; "
        f"the run took {time.perf_counter() - began:.0f} s.\n",
        "| layout | answers at once | decode tokens/s (all rows) | served ÷ this |",
        "|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['layout']} | {row['rows']} | {row['tok_s']:.2f} | {served[row['rows']] / row['tok_s']:.2f}× |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(text, heading, args.results)
    return table


if __name__ == "__main__":
    main()
