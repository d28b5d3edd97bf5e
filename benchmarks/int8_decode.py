"""How close the served int8 decode step's matrix products come to the memory's limit, and what reading q, k, v
and fc1 as one product saves (the model serves them so: `inference.int8_linear.SharedInput`).

    python benchmarks/int8_decode.py            # phi-2's shape: 32 layers, 2560 wide (about 3 min, 6 GB)
    python benchmarks/int8_decode.py --small    # 2 layers, 256 wide (seconds)

A decode step reads every weight once. It is bound by memory bandwidth when its products run at the speed
the memory delivers the weights; what is left above that is overhead. This measures the products of one
decode step as the served model runs them (`inference.int8_linear.Int8Linear` over fbgemm's dynamic int8
Linear, per-row activation scales), for 1 row (one visitor) and 8 (eight decoded together), layer after
layer so the weights come from memory as in the model, not from cache, and the memory's read bandwidth in
turn with them (each round reads 2 GiB once more: on a shared machine the memory's speed changes from one
minute to the next, and a limit measured at another time says little). "Of the read" is the products'
bytes per second over the read's in the same round. phi's decoder layer feeds one
LayerNorm output to q, k, v (attention) and fc1 (MLP): the served arrangement is those four as one
Linear, whose per-row scales and per-output-channel weights give the same numbers as the four apart.
The served weights are also run through fbgemm's product alone, without `Int8Linear`'s per-row scaling
around it (not the served numbers: one activation scale for all rows), to show what that scaling costs, and
with that scaling in torch ops (`Int8Linear.forward_in_torch`) instead of its C kernel (`inference/int8_rows.c`).
Each arrangement runs in turn, 5 rounds; medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.int8_linear import Int8Linear
from inference.measuring import RESULTS, bandwidth_gb_s, cpu_description, write_section

SHAPES = {"phi-2": (32, 2560, 10240), "small": (2, 256, 1024)}  # layers, width, MLP width
ROUNDS = 5
KERNEL_ONLY = "the same, fbgemm's product alone (no per-row scaling)"
TORCH_OPS = "the same, per-row scaling in torch ops (where no C compiler is found)"


def arrangements(width: int, mlp: int) -> dict[str, list[tuple[int, int]]]:
    """(in, out) of each Linear of one decoder layer, in the order a step runs them; the baseline (apart) first."""
    return {
        "q, k, v, dense, fc1, fc2 apart": [(width, width)] * 4 + [(width, mlp), (mlp, width)],
        "q, k, v and fc1 as one (served)": [(width, 3 * width + mlp), (width, width), (mlp, width)],
    }


def int8_layers(shapes: list[tuple[int, int]], layers: int) -> list[list[Int8Linear]]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(deprecated|quantize_per_).*")
        from torch.ao.quantization import per_channel_dynamic_qconfig as qconfig

        built = []
        for _ in range(layers):
            row = []
            for inputs, outputs in shapes:
                linear = nn.Linear(inputs, outputs, device="meta").to_empty(device="cpu")
                with torch.no_grad():
                    linear.weight.normal_(0.0, 0.02)
                    linear.bias.zero_()
                row.append(Int8Linear.from_linear(linear, torch.empty(0, dtype=torch.long), qconfig))
            built.append(row)
        return built


class InTorchOps(nn.Module):
    """An `Int8Linear` computing its per-row scaling in torch ops (`forward_in_torch`), as served without the C
    kernels (`inference.native`)."""

    def __init__(self, linear: Int8Linear) -> None:
        super().__init__()
        self.linear, self.int8, self.in_features = linear, linear.int8, linear.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear.forward_in_torch(x)


def step_seconds(model: list[list[nn.Module]], rows: int) -> float:
    """One pass over every layer's products, `rows` tokens each."""
    widths = [linear.in_features for linear in model[0]]
    inputs = [torch.randn(rows, width) for width in widths]
    start = time.perf_counter()
    with torch.no_grad():
        for layer in model:
            for linear, x in zip(layer, inputs, strict=True):
                linear(x)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="2 layers, 256 wide (seconds; checks the script)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU Basic has 2 vCPUs)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file the table is written to")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    size = "small" if args.small else "phi-2"
    layers, width, mlp = SHAPES[size]
    shapes = arrangements(width, mlp)
    models = {name: int8_layers(linears, layers) for name, linears in shapes.items()}
    weights = {name: layers * sum(i * o for i, o in linears) for name, linears in shapes.items()}  # int8: bytes
    served = list(shapes)[-1]
    # fbgemm's product alone on the served weights (shared, not copied): what the per-row scaling costs.
    models[KERNEL_ONLY] = [[linear.int8 for linear in layer] for layer in models[served]]
    models[TORCH_OPS] = [[InTorchOps(linear) for linear in layer] for layer in models[served]]
    weights[KERNEL_ONLY] = weights[TORCH_OPS] = weights[served]
    times: dict[tuple[str, int], list[float]] = {}
    shares: dict[tuple[str, int], list[float]] = {}  # the products' read speed over the memory's, round by round
    reads = []
    for _ in range(ROUNDS):
        reads.append(bandwidth_gb_s(args.threads))
        for rows in (1, 8):
            for name, model in models.items():
                step_seconds(model, rows)  # warm: the first call of each shape pays its set-up
                seconds = step_seconds(model, rows)
                times.setdefault((name, rows), []).append(seconds)
                shares.setdefault((name, rows), []).append(weights[name] / seconds / 1e9 / reads[-1])
    bandwidth = statistics.median(reads)
    rows_out = []
    for (name, rows), samples in times.items():
        seconds = statistics.median(samples)
        rows_out.append(
            {
                "arrangement": name,
                "rows": rows,
                "ms": seconds * 1e3,
                "gb_s": weights[name] / seconds / 1e9,
                "of_read": statistics.median(shares[name, rows]),
            }
        )
    apart_name = next(iter(shapes))
    apart = {row["rows"]: row["ms"] for row in rows_out if row["arrangement"] == apart_name}
    lines = [
        f"### int8 decode step's products, {size} shape (int8_decode.py, {time.strftime('%Y-%m-%d')})\n",
        f"{cpu_description()}, {args.threads} threads; {layers} decoder layers' int8 Linear layers "
        f"({weights[apart_name] / 1e9:.2f} GB, lm_head not included), medians of {ROUNDS} rounds taken in turn; "
        f"read bandwidth {bandwidth:.1f} GB/s (median of the rounds' reads, {min(reads):.1f}–{max(reads):.1f}), "
        f"so at most {bandwidth * 1e9 / weights[apart_name]:.1f} steps/s; of the read: median of the rounds' "
        f"ratios; the run took {time.perf_counter() - began:.0f} s.\n",
        "| arrangement | rows | products per step | weights read | of the read | × apart |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows_out:
        ratio = apart[row["rows"]] / row["ms"]
        lines.append(
            f"| {row['arrangement']} | {row['rows']} | {row['ms']:.1f} ms | {row['gb_s']:.1f} GB/s | "
            f"{row['of_read']:.0%} | {ratio:.2f}× |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(text, f"### int8 decode step's products, {size} shape", args.results)
    return rows_out


if __name__ == "__main__":
    main()
