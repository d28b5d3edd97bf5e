"""A decode step's attention at the app's geometry: the C kernel the model serves with
(`inference.decode_attention`, every row in one call) against torch's sdpa called row by row (what the model
runs where the kernel cannot be built), for 1 row and 8.

    python benchmarks/decode_attention.py              # phi-2's shape: 32 layers, 32 heads, 80 wide (about 1 min)
    python benchmarks/decode_attention.py --small      # 2 layers, 4 heads, 16 wide (seconds; checks the script)

Each row attends to its own positions of a batch KV cache laid out as the served one (`GrowingLayer`: a buffer
per layer with room after the positions written; the rows joined one step apart, so their lengths differ by
one). One pass is every layer's attention for one step; the keys and values it reads are far larger than the
cache, so it is bound by the memory. The memory's read speed is measured in turn with the passes (each round
reads 2 GiB), and "of the read" is a pass's bytes per second over the read's in the same round. The two methods
take turns, 5 rounds; medians. Before timing, the kernel's rows are checked against sdpa's (largest difference)
and one row against itself computed alone (bit for bit). The table is printed and written to RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.backends.pytorch import ROOM
from inference.decode_attention import decode_attention, kernel
from inference.measuring import RESULTS, bandwidth_gb_s, cpu_description, write_section

SHAPES = {"phi-2": (32, 32, 80), "small": (2, 4, 16)}  # layers, heads, width
POSITIONS = 166  # the app's 126-position prompt and 40 tokens of its answer
ROUNDS = 5


def kv_layers(layers: int, rows: int, heads: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values (rows, heads, positions, width): views of buffers with `ROOM` after them."""
    shape = (rows, heads, POSITIONS + ROOM, width)
    return [tuple(torch.randn(shape)[:, :, :POSITIONS] for _ in range(2)) for _ in range(layers)]


def by_sdpa(query, key, value, firsts, scale) -> torch.Tensor:
    module = torch.nn.Module().eval()
    rows = []
    for row, first in enumerate(firsts):
        keys, values = key[row : row + 1, :, first:], value[row : row + 1, :, first:]
        rows.append(sdpa_attention_forward(module, query[row : row + 1], keys, values, None, scaling=scale)[0])
    return torch.cat(rows)


METHODS = {"C kernel, all rows in one call (served)": decode_attention, "torch sdpa, row by row": by_sdpa}


def pass_seconds(method, queries, layers, firsts, scale) -> float:
    start = time.perf_counter()
    for query, (key, value) in zip(queries, layers, strict=True):
        method(query, key, value, firsts, scale)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="2 layers, 4 heads, 16 wide (seconds)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU Basic has 2 vCPUs)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file the table is written to")
    args = parser.parse_args(argv)
    if kernel() is None:
        parser.error("the decode attention kernel could not be built here (is a C compiler installed?)")
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    size = "small" if args.small else "phi-2"
    layers, heads, width = SHAPES[size]
    scale = width**-0.5
    cases = {}
    for rows in (1, 8):
        firsts = [rows - 1 - row for row in range(rows)]  # the first row joined first: it holds the most
        kv = kv_layers(layers, rows, heads, width)
        queries = [torch.randn(rows, heads, 1, width) for _ in range(layers)]
        read = sum(2 * heads * (POSITIONS - first) * width * 4 for first in firsts) * layers  # fp32 keys, values
        cases[rows] = firsts, kv, queries, read
    key, value = cases[8][1][0]
    query, firsts = cases[8][2][0], cases[8][0]
    served, reference = decode_attention(query, key, value, firsts, scale), by_sdpa(query, key, value, firsts, scale)
    difference = float((served - reference).abs().max())
    alone = decode_attention(query[3:4], key[3:4], value[3:4], firsts[3:4], scale)
    same_alone = torch.equal(alone[0], served[3])
    times: dict[tuple[str, int], list[float]] = {}
    shares: dict[tuple[str, int], list[float]] = {}
    reads = []
    for _ in range(ROUNDS):
        reads.append(bandwidth_gb_s(args.threads))
        for rows, (firsts, kv, queries, read) in cases.items():
            for name, method in METHODS.items():
                seconds = pass_seconds(method, queries, kv, firsts, scale)
                times.setdefault((name, rows), []).append(seconds)
                shares.setdefault((name, rows), []).append(read / seconds / 1e9 / reads[-1])
    table = []
    for (name, rows), samples in times.items():
        share = statistics.median(shares[name, rows])
        table.append({"method": name, "rows": rows, "ms": statistics.median(samples) * 1e3, "of_read": share})
    sdpa = {row["rows"]: row["ms"] for row in table if row["method"] == "torch sdpa, row by row"}
    lines = [
        f"### A decode step's attention, {size} shape (decode_attention.py, {time.strftime('%Y-%m-%d')})\n",
        f"{cpu_description()}, {args.threads} threads; {layers} layers × {heads} heads × {width} wide, fp32 keys and "
        f"values, {POSITIONS} positions in the first row and one fewer in each next (rows joined a step apart); "
        f"one pass: every layer's attention for one step; medians of {ROUNDS} rounds taken in turn; read bandwidth "
        f"{statistics.median(reads):.1f} GB/s (median of the rounds' reads, {min(reads):.1f}–{max(reads):.1f}); "
        f"of the read: median of the rounds' ratios; the kernel's 8 rows against sdpa's: largest difference "
        f"{difference:.1e}; a row alone the same bit for bit as in the batch: {'yes' if same_alone else 'NO'}; "
        f"the run took {time.perf_counter() - began:.0f} s.\n",
        "| method | rows | a pass | of the read | sdpa ÷ this |",
        "|---|---|---|---|---|",
    ]
    for row in table:
        ratio = sdpa[row["rows"]] / row["ms"]
        lines.append(f"| {row['method']} | {row['rows']} | {row['ms']:.1f} ms | {row['of_read']:.0%} | {ratio:.2f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(text, f"### A decode step's attention, {size} shape", args.results)
    return table


if __name__ == "__main__":
    main()
