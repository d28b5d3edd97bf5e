"""What every measurement carries: the CPU it ran on, and the results file it is written to; and the clocks
and served prompts the benchmarks share.

Results on a CPU depend on its class: torch (ATen), MKL, oneDNN and fbgemm (the int8 kernels that serve the
language model) each pick their kernels from the instruction sets they find, and different kernels round
differently and run at different speeds. A newer CPU runs an older class's kernels when all four are told
so (`AVX2_KERNELS`); ATen's setting alone leaves MKL's and oneDNN's choices, which move training results
most, and fbgemm's, which set int8 serving's speed, unchanged.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"
# Instruction sets that decide which matrix kernels run: AVX2 (AMD EPYC as CPU Basic and CI may get),
# AVX-512 and VNNI (Intel Xeon), bf16 and AMX (Sapphire Rapids and later).
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
# The environment that makes torch, MKL, oneDNN and fbgemm use their AVX2 kernels on an AVX-512 machine.
AVX2_KERNELS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
}


def cpu_model_and_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    model, flags = "unknown CPU", set()
    try:
        with open(cpuinfo) as lines:
            for line in lines:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name, the instruction sets that matter for matrix kernels, and any kernel limits set
    in the environment, e.g. "AMD EPYC 7R13 Processor (avx2)"."""
    model, flags = cpu_model_and_flags(cpuinfo)
    present = [flag for flag in FLAGS if flag in flags]
    limits = [f"{name}={os.environ[name]}" for name in AVX2_KERNELS if os.environ.get(name)]
    described = f"{model} ({', '.join(present) or 'no AVX2'})"
    return described + (f", kernels limited by {' '.join(limits)}" if limits else "")


def bandwidth_gb_s(threads: int) -> float:
    """Read bandwidth with `threads` threads: the median of 3 sums over 2 GiB held as 32 tensors of 64 MiB (as a
    model holds its weights, each larger than any cache).

    On a shared machine the memory's speed changes from one minute to the next, so a limit is only worth
    comparing with what was measured beside it: callers take it in turn with the measurement it bounds.
    """
    import torch

    torch.set_num_threads(threads)
    data = [torch.ones(2**24) for _ in range(32)]
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        for tensor in data:
            tensor.sum()
        seconds.append(time.perf_counter() - start)
    return 2**31 / sorted(seconds)[1] / 1e9


def write_section(text: str, heading: str, path: Path = RESULTS) -> None:
    """Write `text` (a markdown section) to `path` in place of the section whose heading starts with `heading`
    (a benchmark's previous run of the same kind, `heading` given with its '### ' or without); the file's other
    sections are kept."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    sections, title = old.split("\n### "), heading.removeprefix("### ")
    kept = [sections[0], *(f"### {s}" for s in sections[1:] if not s.startswith(title))]
    path.write_text("\n".join(part.rstrip("\n") + "\n" for part in kept) + "\n" + text)


class TokenClock:
    """A streamer that records when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt (empty with inputs_embeds)
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


QUESTIONS = ("What is in this picture?", "Describe the scene in detail.", "What colour is the largest object?")


def served_prompts(loaded, rows: int) -> list[tuple[list[int], object]]:
    """`rows` served prompts for a `LoadedBackend`, each with its own question and random image (encoded where the
    backend computes)."""
    import torch

    from inference.prompt import Conversation, Turn, render

    manifest, size = loaded.manifest, loaded.backend.image_size
    asked = []
    for row in range(rows):
        conversation = Conversation((Turn(f"{QUESTIONS[row % len(QUESTIONS)]} (visitor {row})"),))
        ids = render(manifest.template, conversation, loaded.tokenizer, True, image_tokens=manifest.image_tokens)
        pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(row))
        asked.append((ids.input_ids, loaded.backend.encode_images(pixels)))
    return asked


def decode_rate(backend, asked, tokens: int) -> tuple[float, list[list[int]]]:
    """Tokens/s while every row decodes, and the answers; all rows are asked at once on their own threads. The
    window is from the moment the last row has its first token to the moment the first row has its last."""
    from inference.config import GenerationOptions

    clocks, answers = [TokenClock() for _ in asked], [None] * len(asked)

    def ask(row: int) -> None:
        ids, embeds = asked[row]
        options = GenerationOptions(max_new_tokens=tokens)
        answers[row] = backend.generate(ids, embeds, options, streamer=clocks[row], image_key=f"image {row}")

    threads = [threading.Thread(target=ask, args=(row,)) for row in range(len(asked))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    start, end = max(clock.times[0] for clock in clocks), min(clock.times[-1] for clock in clocks)
    arrived = sum(start < moment <= end for clock in clocks for moment in clock.times)
    if end <= start or arrived == 0:
        raise RuntimeError("no window in which every row was decoding: ask for more tokens")
    return arrived / (end - start), answers
