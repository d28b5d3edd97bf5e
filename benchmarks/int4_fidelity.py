"""Can 4-bit weights serve phi-2 faithfully? Logit fidelity of weight formats against the bits each stores,
on the phi-2-shaped stand-in with planted outliers, the fewest bits any code could need, and the speed of
torch's CPU 4-bit kernel against the served int8 one.

    python benchmarks/int4_fidelity.py            # phi-2's shape (about 17 min, 19 GB)
    python benchmarks/int4_fidelity.py --small    # a 0.16B model of phi's structure

Fidelity: phi with random weights of the real shape, outliers planted (`inference.standins`), answers a
prompt greedily in fp32; then its Linear weights are replaced by each format's round trip (quantized and
dequantized, so only the weights' error is measured, as a weight-only kernel computes) and the same
answer is teacher-forced: the minimum logit cosine against fp32 over every answer position. Formats:
int8 per output channel (what the served int8 stores); int4 with one scale and zero point per group of
32 or 128 input columns (torch's `_weight_int4pack_mm_for_cpu` format; llama.cpp's Q4_1 is groups of 32);
and, with the outlier input columns kept in fp32, codes with one searched scale per group of 32: 4-bit
uniform, 4-bit with levels placed for normally spread weights (Lloyd-Max for a Gaussian: the kind of
code NF4 and llama.cpp's IQ4_NL use), 5- and 6-bit uniform (Q5_0's and Q6's widths).

Why no 4-bit code will do: each format's weight error is measured too (squared error over the weights'
squares, all Linear layers). Where the outlier columns are kept, 1 − cosine grows in proportion to it
(the table prints the ratio), so the error the 0.99 bar allows follows. The stand-in's other weights
are independent normal numbers, for which rate-distortion theory gives the fewest bits per weight that
any code, however built, needs for an error D spread over them: ½·log2(1/D). A decode step that reads
every weight once can be at most int8's bits over that many times faster. (A code that gives some
layers more bits than others is not bounded this way; every format here spreads its error evenly.)

Speed: one Linear of phi-2's MLP (2560 → 10240) for one token and for eight, in the served int8
kernel and in torch's 4-bit one.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.measuring import RESULTS, cpu_description, write_section
from inference.standins import plant_outliers, random_phi

ANSWER = 64  # teacher-forced answer positions
PROMPT = 160  # prompt positions (the served prompt: system prompt, 49 image positions, a question)


def round_trip(weight: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """`weight` (out, in) quantized and dequantized: symmetric per output channel (group None), else with a
    scale and zero point per `group` input columns (asymmetric, as torch's int4 kernel and llama.cpp's Q4_1)."""
    if group is None:
        scale = weight.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        return (weight / scale).round() * scale
    rows, columns = weight.shape
    grouped = weight.reshape(rows, columns // group, group)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    scale = ((high - low) / (2**bits - 1)).clamp_min(1e-12)
    return (((grouped - low) / scale).round() * scale + low).reshape(rows, columns)


def gaussian_levels(count: int = 16, steps: int = 200) -> torch.Tensor:
    """The `count` levels that quantize a standard normal number with the least squared error (Lloyd-Max:
    each boundary halfway between two levels, each level the mean of the normal between its boundaries)."""
    grid = torch.linspace(-6, 6, 60001, dtype=torch.float64)
    density = torch.exp(-(grid**2) / 2)
    levels = torch.linspace(-2, 2, count, dtype=torch.float64)
    for _ in range(steps):
        cell = torch.bucketize(grid, (levels[1:] + levels[:-1]) / 2)
        mass = torch.zeros(count, dtype=torch.float64).index_add_(0, cell, density)
        levels = torch.zeros(count, dtype=torch.float64).index_add_(0, cell, density * grid) / mass
    return levels.float()


def nearest(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The nearest of `levels` (sorted) to each of `values`; integer levels by rounding, which is faster."""
    if torch.equal(levels, torch.arange(len(levels), dtype=levels.dtype) + levels[0]):
        return values.round().clamp(levels[0], levels[-1])
    return levels[torch.bucketize(values, (levels[1:] + levels[:-1]) / 2)]


def code_round_trip(
    weight: torch.Tensor, levels: torch.Tensor, group: int = 32, tries: int = 8, chunk: int = 256
) -> torch.Tensor:
    """`weight` (out, in) coded as one scale per `group` input columns times one of `levels` per weight; each
    group's scale is the best of `tries` between its absmax over the largest level and 60 % of that (a
    clipped scale rounds the bulk finer), as llama.cpp searches its scales. `chunk` rows at a time."""
    rows, columns = weight.shape
    factors = torch.linspace(1.0, 0.6, tries)
    coded = torch.empty_like(weight)
    for start in range(0, rows, chunk):
        grouped = weight[start : start + chunk].reshape(-1, columns // group, group)
        largest = grouped.abs().amax(-1, keepdim=True).clamp_min(1e-12) / levels.abs().max()
        errors = [
            (nearest(grouped / (largest * factor), levels) * (largest * factor) - grouped).square().sum(-1)
            for factor in factors.tolist()
        ]
        scale = largest * factors[torch.stack(errors).argmin(0)].unsqueeze(-1)
        coded[start : start + chunk] = (nearest(grouped / scale, levels) * scale).reshape(-1, columns)
    return coded


def uniform_levels(bits: int) -> torch.Tensor:
    """Integers −2^(bits−1) … 2^(bits−1) − 1, as llama.cpp's Q4_0/Q5_0 store them."""
    return torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.float32)


FORMATS = {  # name: (round trip, bits per weight with its scales, keep the outlier columns in fp32)
    "int8, per channel": (lambda w: round_trip(w, 8, None), 8 + 32 / 2560, False),
    "int4, groups of 128": (lambda w: round_trip(w, 4, 128), 4 + 32 / 128, False),
    "int4, groups of 32": (lambda w: round_trip(w, 4, 32), 4 + 32 / 32, False),
    "int4, groups of 32, outlier columns fp32": (lambda w: round_trip(w, 4, 32), 4 + 32 / 32, True),
    "4-bit uniform, groups of 32, searched scale": (lambda w: code_round_trip(w, uniform_levels(4)), 4.5, True),
    "4-bit Gaussian levels, groups of 32, searched scale": (lambda w: code_round_trip(w, gaussian_levels()), 4.5, True),
    "5-bit uniform, groups of 32, searched scale": (lambda w: code_round_trip(w, uniform_levels(5)), 5.5, True),
    "6-bit uniform, groups of 32, searched scale": (lambda w: code_round_trip(w, uniform_levels(6)), 6.5, True),
}
BAR = 0.99  # the served bar: min logit cosine against fp32


@torch.no_grad()
def fidelity(size: str) -> dict[str, dict[str, float]]:
    """Per format: its min logit cosine against fp32 and its weight error (squared error over squares)."""
    torch.manual_seed(0)
    model = random_phi(size).eval()  # fp16, as phi-2 ships; computed in fp32 below
    massive = [50256, 198]  # GPT-2's end of text (the first token) and "\n": the massive-activation tokens
    outliers = plant_outliers(model, massive)
    originals = {name: module.weight.clone() for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    model.float()
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 50000, (1, PROMPT), generator=generator)
    prompt[0, 0], prompt[0, 40] = massive
    ids = model.generate(prompt, max_new_tokens=ANSWER, do_sample=False, min_new_tokens=ANSWER)
    reference = model(ids).logits[0, PROMPT - 1 : -1].clone()
    columns = torch.tensor(outliers.dims)
    scores = {}
    for name, (code, _, keep) in FORMATS.items():
        error = squares = 0.0
        for module_name, weight in originals.items():
            linear = model.get_submodule(module_name)
            weight = weight.float()
            quantized = code(weight)
            if keep:
                quantized[:, columns] = weight[:, columns]
            error += float((quantized - weight).square().sum())
            squares += float(weight.square().sum())
            linear.weight.copy_(quantized)
        logits = model(ids).logits[0, PROMPT - 1 : -1]
        cosine = float(torch.nn.functional.cosine_similarity(logits, reference, dim=-1).min())
        scores[name] = {"cosine": cosine, "error": error / squares}
        print(f"{name}: min logit cosine {cosine:.4f}, weight error {error / squares:.2e}", flush=True)
    return scores


def fewest_bits(scores: dict[str, dict[str, float]]) -> tuple[float, float, float]:
    """(1 − cosine) per unit of weight error where the outlier columns are kept (the median over those formats),
    the weight error the bar allows, and the fewest bits per weight that give it (rate-distortion bound for
    independent normal weights)."""
    ratios = sorted((1 - score["cosine"]) / score["error"] for name, score in scores.items() if FORMATS[name][2])
    ratio = ratios[len(ratios) // 2]
    allowed = (1 - BAR) / ratio
    return ratio, allowed, 0.5 * math.log2(1 / allowed)


def kernel_ms(rounds: int = 7) -> dict[str, dict[int, float]]:
    """ms per call of one 2560 → 10240 Linear, one row and eight: the kernels take turns, 20 calls each per
    round; the median round."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    weight = torch.randn(10240, 2560) * 0.02
    linear = nn.Linear(2560, 10240)
    linear.weight.data = weight.clone()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        int8 = quantize_dynamic(nn.Sequential(linear), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)[0]
    grouped = weight.reshape(10240, 2560 // 32, 32)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-12)
    values = ((grouped - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(10240, 2560)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    zeros = low + 8 * scale  # the kernel computes (value - 8) * scale + zero
    scales_zeros = torch.stack([scale[..., 0], zeros[..., 0]], -1).transpose(0, 1).contiguous()
    scales_zeros16 = scales_zeros.bfloat16()
    calls = {}
    for rows in (1, 8):
        x = torch.randn(rows, 2560)
        x16 = x.bfloat16()
        calls["int8 (served: fbgemm, fp32 activations)", rows] = lambda x=x: int8(x)
        calls["int4 (bf16 activations)", rows] = lambda x=x16: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed, 32, scales_zeros16
        )
    seconds: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            call()
            start = time.perf_counter()
            for _ in range(20):
                call()
            seconds[key].append((time.perf_counter() - start) / 20)
    timings: dict[str, dict[int, float]] = {}
    for (name, rows), values in seconds.items():
        timings.setdefault(name, {})[rows] = statistics.median(values) * 1e3
    return timings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = "small" if args.small else "phi-2"
    print(cpu_description(), flush=True)
    scores, timings = fidelity(size), kernel_ms()
    ratio, allowed, bits = fewest_bits(scores)
    int8_bits = FORMATS["int8, per channel"][1]
    lines = [
        f"### 4-bit weights, {size} shape ({time.strftime('%Y-%m-%d')})",
        "",
        f"int4_fidelity.py: {cpu_description()}, {args.threads} threads. Weights round-tripped through each "
        f"format, outliers planted; min logit cosine against fp32 over {ANSWER} teacher-forced answer positions "
        f"(the served bar is {BAR}); weight error: squared error over the weights' squares, all Linear layers.",
        "",
        "| weights | bits per weight | weight error | (1 − cosine) ÷ error | min logit cosine |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {FORMATS[name][1]:.2f} | {score['error']:.2e} | {(1 - score['cosine']) / score['error']:.1f} "
            f"| {score['cosine']:.4f} |"
            for name, score in scores.items()
        ),
        "",
        f"Where the outlier columns are kept, 1 − cosine ≈ {ratio:.1f} × the weight error (median), so the bar "
        f"allows a weight error of {allowed:.2e}. For independent normal weights no code that spreads its error "
        f"over them reaches that in fewer than ½·log2(1/error) = **{bits:.2f} bits per weight**; a decode step that "
        f"reads each weight once is then at most {int8_bits:.2f} ÷ {bits:.2f} = **{int8_bits / bits:.2f}×** the "
        "int8 one's speed at this fidelity.",
        "",
        "| one 2560 → 10240 Linear | 1 row | 8 rows |",
        "|---|---|---|",
        *(f"| {name} | {ms[1]:.2f} ms | {ms[8]:.2f} ms |" for name, ms in timings.items()),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(text, "### 4-bit weights", args.results)
    return {"scores": scores, "timings": timings, "fewest_bits": bits}


if __name__ == "__main__":
    main()
