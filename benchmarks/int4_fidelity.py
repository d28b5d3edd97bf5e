"""Can 4-bit weights serve phi-2 faithfully? Logit fidelity of 4-bit weight formats on the phi-2-shaped
stand-in with planted outliers, and the speed of torch's CPU 4-bit kernel against the served int8 one.

    python benchmarks/int4_fidelity.py            # phi-2's shape (about 5 min, 12 GB)
    python benchmarks/int4_fidelity.py --small    # a 0.16B model of phi's structure

Fidelity: phi with random weights of the real shape, outliers planted (`inference.standins`), answers a
prompt greedily in fp32; then its Linear weights are replaced by each format's round trip (quantized and
dequantized, so only the weights' error is measured, as a weight-only kernel computes) and the same
answer is teacher-forced: the minimum logit cosine against fp32 over every answer position. Formats:
int8 per output channel (what the served int8 stores), int4 with one scale and zero point per group of
32 or 128 input columns (torch's `_weight_int4pack_mm_for_cpu` format; llama.cpp's Q4_0/Q4_1 are groups
of 32), and int4 groups of 32 with the outlier input columns kept in fp32. Speed: one Linear of phi-2's
MLP (2560 → 10240) for one token and for eight, in the served int8 kernel and in the 4-bit one.
"""

from __future__ import annotations

import argparse
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


FORMATS = {  # name: (bits, group, keep the outlier columns in fp32)
    "int8, per channel": (8, None, False),
    "int4, groups of 128": (4, 128, False),
    "int4, groups of 32": (4, 32, False),
    "int4, groups of 32, outlier columns fp32": (4, 32, True),
}


@torch.no_grad()
def fidelity(size: str) -> dict[str, float]:
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
    scores = {}
    for name, (bits, group, keep) in FORMATS.items():
        for module_name, weight in originals.items():
            linear = model.get_submodule(module_name)
            weight = weight.float()
            quantized = round_trip(weight, bits, group)
            if keep:
                columns = torch.tensor(outliers.dims)
                quantized[:, columns] = weight[:, columns]
            linear.weight.copy_(quantized)
        logits = model(ids).logits[0, PROMPT - 1 : -1]
        scores[name] = float(torch.nn.functional.cosine_similarity(logits, reference, dim=-1).min())
        print(f"{name}: min logit cosine {scores[name]:.4f}", flush=True)
    return scores


def kernel_ms() -> dict[str, dict[int, float]]:
    """ms per call of one 2560 → 10240 Linear, one row and eight."""
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
    timings: dict[str, dict[int, float]] = {
        "int8 (served: fbgemm, fp32 activations)": {},
        "int4 (bf16 activations)": {},
    }
    for rows in (1, 8):
        x = torch.randn(rows, 2560)
        x16, scales_zeros16 = x.bfloat16(), scales_zeros.bfloat16()
        calls = {
            "int8 (served: fbgemm, fp32 activations)": lambda x=x: int8(x),
            "int4 (bf16 activations)": lambda x=x16, sz=scales_zeros16: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, packed, 32, sz
            ),
        }
        for name, call in calls.items():
            for _ in range(10):
                call()
            start = time.perf_counter()
            for _ in range(100):
                call()
            timings[name][rows] = (time.perf_counter() - start) * 10
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
    lines = [
        f"### 4-bit weights, {size} shape ({time.strftime('%Y-%m-%d')})",
        "",
        f"int4_fidelity.py: {cpu_description()}, {args.threads} threads. Weights round-tripped through each "
        f"format, outliers planted; min logit cosine against fp32 over {ANSWER} teacher-forced answer positions "
        "(the served bar is 0.99).",
        "",
        "| weights | min logit cosine |",
        "|---|---|",
        *(f"| {name} | {score:.4f} |" for name, score in scores.items()),
        "",
        "| one 2560 → 10240 Linear | 1 row | 8 rows |",
        "|---|---|---|",
        *(f"| {name} | {ms[1]:.2f} ms | {ms[8]:.2f} ms |" for name, ms in timings.items()),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(text, "4-bit weights", args.results)
    return {"scores": scores, "timings": timings}


if __name__ == "__main__":
    main()
