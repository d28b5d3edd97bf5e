"""Pretraining phi-1.5's real shape on one GPU with the original settings: peak memory and tokens/s.

The original project pretrained phi-1.5 (1.42 B parameters) on an A100-40GB. This runs the project's own
pretraining script, `training.pretrain`, for a few dozen optimizer steps of that recipe (bitsandbytes
Adam8bit, bf16/fp16 autocast, micro-batch 1 × gradient accumulation 4, 2,048-token sequences, lr 6e-3
warming up, clipping at 1.0; training/configs/pretrain_original.yaml), once without and once with gradient
checkpointing. No internet is needed: the text is this Python's own standard library, tokenised with
GPT-2's BPE (phi's vocabulary, rebuilt offline from whisper's bundled file by inference.tiny).

Reported per run: peak GPU memory (allocated and reserved by PyTorch), what that leaves of the original's
40 GB, median tokens/s and MFU over the logged windows (the first, with its warm-up, left out), time per
optimizer step, and the held-out loss before and after. The table is printed and appended to
benchmarks/RESULTS.md.

    python benchmarks/pretrain_gpu.py                 # a CUDA GPU: both runs in a few minutes (under 10)
    python benchmarks/pretrain_gpu.py --cpu-smoke --size tiny --steps 2 --block-size 64 --results /tmp/r.md
                                                      # the same code path on a CPU, to check it (no GPU numbers)
"""

from __future__ import annotations

import argparse
import csv
import gc
import sys
import sysconfig
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.tiny import build_gpt2_tokenizer  # noqa: E402
from training import prepare_text, pretrain  # noqa: E402
from training.config import parse_config  # noqa: E402
from training.optim import resolve_precision  # noqa: E402

ORIGINAL_CONFIG = ROOT / "training" / "configs" / "pretrain_original.yaml"
ORIGINAL_GPU_GIB = 39.59  # the original run's A100-40GB, as PyTorch counts it ("39.59 GiB total capacity")
EVAL_BATCHES = 4  # held-out sequences per evaluation (before and after)
HELD_OUT = 0.05
BYTES_PER_TOKEN = 3  # Python source under GPT-2's BPE, roughly: how much text to read for the tokens needed
MIN_TEXT_BYTES = 200_000  # a dozen modules at least, so that whole documents can be held out


def stdlib_text(folder: Path, min_bytes: int) -> Path:
    """This Python's standard-library modules, in name order, as .txt documents, until `min_bytes` are there."""
    folder.mkdir(parents=True)
    written = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        (folder / f"{path.stem}.txt").write_text(text)
        written += len(text.encode())
        if written >= min_bytes:
            break
    return folder


def prepare_corpus(work: Path, tokenizer: str, tokens: int) -> Path:
    """A packed corpus of at least `tokens` training tokens (when the standard library has them)."""
    text = stdlib_text(work / "text", min_bytes=max(MIN_TEXT_BYTES, int(tokens / (1 - HELD_OUT)) * BYTES_PER_TOKEN))
    out = work / "corpus"
    prepare_text.prepare([f"stdlib={text}"], out, tokenizer=tokenizer, held_out=HELD_OUT)
    return out


def log_rows(log: Path) -> list[dict[str, str]]:
    with open(log, newline="") as file:
        return list(csv.DictReader(file))


def run(corpus: Path, output: Path, args: argparse.Namespace, checkpointing: bool) -> dict[str, Any]:
    """One pretraining run of `args.steps` optimizer steps; its speed, memory and losses."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    original = parse_config(pretrain.PretrainConfig, ["--config", str(ORIGINAL_CONFIG), "--data", str(corpus)])
    config = replace(
        original,
        output_dir=str(output),
        size=args.size,
        block_size=args.block_size,
        max_steps=args.steps,
        log_every=max(1, args.steps // 6),
        eval_every=args.steps,
        eval_batches=EVAL_BATCHES,
        samples=1,
        save_every=args.steps,
        num_workers=1,
        gradient_checkpointing=checkpointing,
    )
    started = time.perf_counter()
    summary = pretrain.run(config)
    seconds = time.perf_counter() - started
    rows = log_rows(output / "log.csv")
    evals = [float(row["eval_loss"]) for row in rows if row["eval_loss"]]
    config = summary["config"]
    tokens_per_step = config["global_batch_size"] * config["block_size"]
    result = {
        "gradient_checkpointing": checkpointing,
        "steps": summary["steps"],
        "parameters": summary["parameters"],
        "precision": resolve_precision(config["mixed_precision"]),
        "tokens_per_s": summary["tokens_per_s"],
        "mfu": summary["mfu"],
        "step_s": tokens_per_step / summary["tokens_per_s"],
        "eval_start": evals[0],
        "eval_end": evals[-1],
        "seconds": seconds,
        "peak_allocated_gib": None,
        "peak_reserved_gib": None,
    }
    if torch.cuda.is_available():
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return result


def table(rows: list[dict[str, Any]], args: argparse.Namespace, device: str, minutes: float) -> str:
    first = rows[0]
    parameters = first["parameters"]
    size = f"{parameters / 1e9:.2f} B" if parameters >= 1e9 else f"{parameters / 1e6:.1f} M"
    lines = [
        f"\n### Pretraining from scratch, {args.size} shape ({size} parameters), "
        f"original settings — {device}, {datetime.now(UTC):%Y-%m-%d}\n",
        f"`python benchmarks/pretrain_gpu.py{' ' + ' '.join(args.argv) if args.argv else ''}`: {first['steps']} "
        f"optimizer steps × 4 sequences × {args.block_size} tokens, Adam8bit, {first['precision']} autocast; "
        f"both runs took {minutes:.1f} min. The original run needed an A100-40GB ({ORIGINAL_GPU_GIB} GiB).\n",
        "| gradient checkpointing | peak allocated | peak reserved | left on an A100-40GB | tokens/s | MFU | step time "
        "| held-out loss before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["peak_allocated_gib"] is None:
            allocated = reserved = headroom = "n/a (CPU)"
        else:
            allocated, reserved = f"{row['peak_allocated_gib']:.1f} GiB", f"{row['peak_reserved_gib']:.1f} GiB"
            headroom = f"{ORIGINAL_GPU_GIB - row['peak_reserved_gib']:.1f} GiB"
        mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
        lines.append(
            f"| {'on' if row['gradient_checkpointing'] else 'off'} | {allocated} | {reserved} | {headroom} "
            f"| {row['tokens_per_s']:,.0f} | {mfu} | {row['step_s']:.2f} s "
            f"| {row['eval_start']:.2f} → {row['eval_end']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(pretrain.SIZES), default="phi-1.5", help="model shape")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--block-size", type=int, default=pretrain.PHI_CONTEXT, help="tokens per sequence")
    parser.add_argument("--tokenizer", help="tokenizer folder; default: GPT-2's BPE rebuilt offline (phi's ids)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="table goes here")
    parser.add_argument("--cpu-smoke", action="store_true", help="run on the CPU to check the code path")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit(
            "benchmarks/pretrain_gpu.py needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False). "
            "To check the code path on a CPU: --cpu-smoke --size tiny --steps 2 --block-size 64 --results FILE"
        )
    if args.steps <= 0:
        parser.error("--steps must be positive")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke run, no GPU numbers)"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        tokenizer = args.tokenizer
        if tokenizer is None:
            build_gpt2_tokenizer().save_pretrained(work / "tokenizer")
            tokenizer = str(work / "tokenizer")
        sequences = args.steps * 4 + EVAL_BATCHES  # the original's global batch of 4, and the held-out ones
        corpus = prepare_corpus(work, tokenizer, tokens=sequences * args.block_size)
        rows = [run(corpus, work / f"run-{checkpointing}", args, checkpointing) for checkpointing in (False, True)]
    report = table(rows, args, device, (time.perf_counter() - started) / 60)
    print(report)
    with open(args.results, "a") as results:
        results.write(report)
    return rows


if __name__ == "__main__":
    main()
