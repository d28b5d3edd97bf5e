"""The benchmarks run end to end (at the sizes CI can afford); numbers are not judged."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from benchmarks import (
    computing_thread,
    cpu_inference,
    decode_attention,
    int4_fidelity,
    int8_decode,
    load,
    served_decode,
)
from inference.measuring import write_section


def test_cpu_inference_small_mode_measures_every_method_in_one_run(tmp_path):
    results_file = tmp_path / "RESULTS.md"
    results_file.write_text("# Benchmark results\n\n### GPU run\n\nkept\n")
    methods = ["original", "int8"]  # the rest left out for time (tests/test_export_gguf.py runs llama.cpp's paths)
    results = cpu_inference.main(["--small", "--methods", *methods, "--results", str(results_file)])
    assert list(results) == methods
    for method, result in results.items():
        assert result["first_s"] > 0 and result["decode_tok_s"] > 0 and result["load_peak"] > 0, method
        assert len(result["tokens"]) == cpu_inference.NEW_TOKENS
    assert results["int8"]["reused_positions"] > 0
    text = results_file.read_text()
    assert "### GPU run\n\nkept" in text  # other tables stay
    rows = re.findall(r"^\| (original|fp32|bf16|int8) \|", text, flags=re.M)
    assert rows == methods
    assert re.search(r"^\| torch \| [\d.]+ s \| .* \| [\d.]+ s \|", text, flags=re.M)  # the app started twice
    assert "outliers planted through the weights" in text and "Fastest whole answer at logit cosine" in text
    write_section("### CPU inference, small shape (again)\n", "### CPU inference, small shape", results_file)
    rewritten = results_file.read_text()
    assert rewritten.count("### CPU inference") == 1 and "(again)" in rewritten and "kept" in rewritten
    write_section("### CPU inference, small shape (once more)\n", "CPU inference, small shape", results_file)
    rewritten = results_file.read_text()  # a heading given without its '### ' replaces the section too
    assert rewritten.count("### CPU inference") == 1 and "(once more)" in rewritten and "kept" in rewritten


@pytest.mark.parametrize("backend", ["torch", "llama.cpp"])
def test_load_benchmark_asks_the_running_app_with_several_visitors_at_once(tmp_path, backend):
    results_file = tmp_path / "RESULTS.md"
    earlier = f"### Visitors at once, {backend} backend, an earlier run (load.py)\n\nearlier rows\n"
    results_file.write_text(f"# Benchmark results\n\n{earlier}")
    args = ["--demo", "--users", "1", "3", "--baseline-users", "1", "--rounds", "2", "--tokens", "8"]
    tables = load.main([*args, "--backend", backend, "--results", str(results_file)])
    # The wave both apps are asked by is asked in each round; the others once.
    assert [(row["users"], row["waves"]) for row in tables[8]] == [(1, 2), (3, 1)]
    assert [(row["users"], row["waves"]) for row in tables[1]] == [(1, 2)]
    for row in tables[8] + tables[1]:
        assert row["answered"] == row["users"] * row["waves"] and row["refused"] == row["lost"] == 0
        assert 0 < row["first_p50"] <= row["total_p50"] and row["tokens_s"] > 0 and row["peak"] > 0
    text = results_file.read_text()
    assert "earlier rows" not in text  # the earlier run's section is replaced
    assert (
        text.count("### Visitors at once") == 1 and len(re.findall(r"^\| (8|1) \| \d+ \| \d \|", text, flags=re.M)) == 3
    )
    # One at a time has no ratio; the batched wave of 1 has the median of its 2 rounds' ratios and their range.
    (ratio,) = re.findall(r"^\| 8 \| 1 \| 2 \|.*\| ([\d.]+× \([\d.]+–[\d.]+\)) \|", text, flags=re.M)
    low, high = map(float, re.findall(r"[\d.]+", ratio)[1:])
    assert low <= float(ratio.split("×")[0]) <= high


def test_int8_decode_benchmark_compares_the_served_products_with_fused_ones(tmp_path):
    results_file = tmp_path / "RESULTS.md"
    rows = int8_decode.main(["--small", "--results", str(results_file)])
    assert sorted((row["arrangement"], row["rows"]) for row in rows) == [
        ("q, k, v and fc1 as one (served)", 1),
        ("q, k, v and fc1 as one (served)", 8),
        ("q, k, v, dense, fc1, fc2 apart", 1),
        ("q, k, v, dense, fc1, fc2 apart", 8),
        (int8_decode.KERNEL_ONLY, 1),
        (int8_decode.KERNEL_ONLY, 8),
        (int8_decode.TORCH_OPS, 1),
        (int8_decode.TORCH_OPS, 8),
    ]
    assert all(row["ms"] > 0 and row["gb_s"] > 0 and row["of_read"] > 0 for row in rows)
    text = results_file.read_text()
    assert text.count("### int8 decode step's products, small shape") == 1
    assert re.search(r"read bandwidth [\d.]+ GB/s \(median of the rounds' reads, [\d.]+–[\d.]+\)", text)
    names = r"q, k, v, dense, fc1, fc2 apart|q, k, v and fc1 as one \(served\)|the same, "
    assert len(re.findall(rf"^\| ({names})", text, flags=re.M)) == 8


def test_decode_attention_benchmark_times_the_kernel_against_sdpa_row_by_row(tmp_path):
    results_file = tmp_path / "RESULTS.md"
    table = decode_attention.main(["--small", "--results", str(results_file)])
    assert sorted((row["method"], row["rows"]) for row in table) == [
        ("C kernel, all rows in one call (served)", 1),
        ("C kernel, all rows in one call (served)", 8),
        ("torch sdpa, row by row", 1),
        ("torch sdpa, row by row", 8),
    ]
    assert all(row["ms"] > 0 and row["of_read"] > 0 for row in table)
    text = results_file.read_text()
    assert text.count("### A decode step's attention, small shape") == 1
    assert "a row alone the same bit for bit as in the batch: yes" in text
    difference = float(re.search(r"largest difference ([\d.e+-]+);", text).group(1))
    assert difference < 1e-5


def test_served_decode_benchmark_runs_every_arrangement_through_the_batcher(tmp_path):
    results_file = tmp_path / "RESULTS.md"
    table = served_decode.main(["--demo", "--tokens", "12", "--rounds", "1", "--results", str(results_file)])
    assert sorted((row["arrangement"], row["rows"]) for row in table) == [
        ("apart", 1),
        ("apart", 8),
        ("llama.cpp Q8_0", 1),
        ("llama.cpp Q8_0", 8),
        ("one product (served)", 1),
        ("one product (served)", 8),
    ]
    assert all(row["tok_s"] > 0 for row in table)
    text = results_file.read_text()
    assert text.count("### Served decode") == 1  # named for its kernel class (", AVX2 kernels" when limited)
    assert text.count(": shared-input products and backends (served_decode.py") == 1
    assert "greedy answers equal in both int8 arrangements: yes" in text
    rows = r"^\| (one product \(served\)|apart|llama.cpp Q8_0) \| [18] \|"
    assert len(re.findall(rows, text, flags=re.M)) == 6


def test_computing_thread_benchmark_decodes_in_both_layouts_in_fresh_processes(tmp_path):
    results_file = tmp_path / "RESULTS.md"
    table = computing_thread.main(["--demo", "--tokens", "12", "--rounds", "1", "--results", str(results_file)])
    layouts = (computing_thread.SERVED, computing_thread.BEFORE)
    assert sorted((row["layout"], row["rows"]) for row in table) == sorted(
        (layout, rows) for layout in layouts for rows in (1, 8)
    )
    assert all(row["tok_s"] > 0 for row in table)
    text = results_file.read_text()
    assert text.count("### One computing thread (computing_thread.py") == 1
    assert "greedy answers equal in both layouts: yes" in text
    assert len(re.findall(r"^\| loaded .* \| [18] \| [0-9.]+ \| [0-9.]+× \|$", text, flags=re.M)) == 4


def test_int4_fidelity_codes_err_as_theory_says_and_bound_the_bits():
    levels = int4_fidelity.gaussian_levels()  # Lloyd-Max for a standard normal (Max, 1960): ±2.733 … ±0.128
    assert torch.allclose(levels, -levels.flip(0), atol=1e-3)
    assert abs(levels[-1] - 2.733) < 0.01 and abs(levels[8] - 0.128) < 0.01
    normal = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    assert abs(float((int4_fidelity.nearest(normal, levels) - normal).square().mean()) - 0.00950) < 0.0005
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(1)) * 0.02

    def error(coded):
        return float((coded - weight).square().sum() / weight.square().sum())

    errors = [error(int4_fidelity.code_round_trip(weight, int4_fidelity.uniform_levels(b))) for b in (4, 5, 6)]
    assert all(3 < coarse / fine < 5 for coarse, fine in itertools.pairwise(errors))  # each bit: about 4× less
    absmax_only = int4_fidelity.code_round_trip(weight, int4_fidelity.uniform_levels(4), tries=1)
    assert errors[0] < error(absmax_only)  # the searched scale beats the absmax one
    assert error(int4_fidelity.code_round_trip(weight, levels)) < errors[0]  # Gaussian levels beat uniform ones
    kept = [name for name, (_, _, keep) in int4_fidelity.FORMATS.items() if keep]
    scores = {name: {"error": 1e-3 * (index + 1), "cosine": 1 - 5e-3 * (index + 1)} for index, name in enumerate(kept)}
    ratio, allowed, bits = int4_fidelity.fewest_bits(scores)
    assert math.isclose(ratio, 5) and math.isclose(allowed, 2e-3) and math.isclose(bits, 0.5 * math.log2(500))
