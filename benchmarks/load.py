"""Visitors at once: 1, 2, 4, … users ask the running app together, each with their own image and a 64-token
answer, through gradio_client as a browser would; the app with its batching (`--slots 8`) against the same
app answering one at a time (`--slots 1`), measured in the same run on the same machine.

    python benchmarks/load.py --weights FOLDER --whisper WHISPER.pt   # a weights folder, e.g. the phi-2-shaped
                                                                      # stand-in benchmarks/cpu_inference.py builds
    python benchmarks/load.py --demo --users 1 2 --tokens 8           # tiny random models: the script works
    python benchmarks/load.py ... --backend llama.cpp                 # the app serving through llama.cpp

Both apps run side by side, each first answering a wave of the most visitors both are asked, not counted (a
process's first wave of many is slower: its KV caches' memory is new). The waves both are asked
(`--baseline-users`, 1 and 8 visitors) take turns,
`--rounds` rounds: the batched app, then the one-at-a-time app, in the next round the other way round, so that
a drift in the machine's speed (a shared VM's changes within minutes) and whatever the wave before leaves behind
fall on both; the ratio is the median of the rounds' ratios, shown
with its range. The other waves are asked once, after. For each number of users: p50 / p95 time to the
first streamed word and to the whole answer (over every round's answers), the answers' tokens per second
all together (median of the rounds), the app's peak memory while serving, and the visitors turned away
because the queue was full (the last wave asks more than the app answers and queues: `--slots` +
QUEUE_SIZE). Greedy answers, so each run computes the same tokens. The table is printed and written to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.measuring import RESULTS, cpu_description, write_section

ROOT = Path(__file__).resolve().parents[1]
QUEUE = 16  # the app's QUEUE_SIZE in these runs


@contextmanager
def running_app(weights: Path, whisper: Path, slots: int, threads: int, home: Path, backend: str = "torch"):
    """`python app.py` in a subprocess (offline, its int8 or GGUF file saved under `home`); yields (url, pid) once
    it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "GRADIO_ANALYTICS_ENABLED": "False"}
    env |= {"QUEUE_SIZE": str(QUEUE), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, str(ROOT / "app.py"), "--weights", str(weights), "--whisper", str(whisper)]
    command += ["--backend", backend, "--slots", str(slots), "--port", str(port)]
    log = open(home / f"app-{slots}.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited:\n{(home / f'app-{slots}.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                time.sleep(1)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(30)
        log.close()


class PeakMemory:
    """The app process's largest resident memory while in use (sampled at the start, every 0.2 s and at the end)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.stopped = pid, 0, threading.Event()

    def __enter__(self) -> PeakMemory:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        self._sample()
        while not self.stopped.wait(0.2):
            self._sample()

    def _sample(self) -> None:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                self.peak = max(self.peak, int(line.split()[1]) * 1024)

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
        self._sample()  # a wave shorter than one interval still has its sample at the end


def visitor(url: str, image: Path, tokens: int, tokenizer) -> dict:
    """One visitor's question: when the first word and the whole answer arrived, and how many tokens it had."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    start = time.perf_counter()
    job = client.submit(handle_file(str(image)), "What is in this picture?", None, tokens, 0.0, 1.0, api_name="/ask")
    first = None
    while first is None and not job.done():  # then the visitor waits without waking: it shares the app's cores
        outputs = job.outputs()
        if outputs and answer_text(outputs[-1]):
            first = time.perf_counter() - start
        time.sleep(0.02)
    try:
        messages = job.result()
    except Exception as error:  # gradio_client raises the app's refusal
        if "queue is full" in str(error).lower():
            return {"refused": True}
        raise
    total = time.perf_counter() - start
    answer = answer_text(messages)
    return {"refused": False, "first": first or total, "total": total, "tokens": len(tokenizer(answer).input_ids)}


def answer_text(messages) -> str:
    if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
        return ""
    return "".join(part["text"] for part in messages[-1]["content"] if part["type"] == "text")


def wave(url: str, pid: int, images: list[Path], users: int, tokens: int, tokenizer) -> dict:
    """`users` visitors asking at once: each answer's times, the tokens answered over the wave's wall time."""
    results: list[dict] = [{}] * users
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, visitor(url, images[i], tokens, tokenizer)))
        for i in range(users)
    ]
    with PeakMemory(pid) as memory:
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    answered = [result for result in results if result and not result["refused"]]
    refused = sum(1 for result in results if result.get("refused"))
    return {
        "users": users,
        "answered": len(answered),
        "refused": refused,
        "lost": users - len(answered) - refused,
        "firsts": [result["first"] for result in answered],
        "totals": [result["total"] for result in answered],
        "tokens_s": sum(result["tokens"] for result in answered) / wall,
        "peak": memory.peak,
    }


def summary(waves: list[dict]) -> dict:
    """One table row from the waves of one number of users: counts summed, percentiles over every answer,
    the last answer and tokens/s the median of the waves', the peak the largest."""
    firsts = [moment for wave in waves for moment in wave["firsts"]]
    totals = [moment for wave in waves for moment in wave["totals"]]
    return {
        "users": waves[0]["users"],
        "waves": len(waves),
        **{key: sum(wave[key] for wave in waves) for key in ("answered", "refused", "lost")},
        "first_p50": percentile(firsts, 50),
        "first_p95": percentile(firsts, 95),
        "total_p50": percentile(totals, 50),
        "total_p95": percentile(totals, 95),
        "last": statistics.median(max(wave["totals"], default=float("nan")) for wave in waves),
        "tokens_s": statistics.median(wave["tokens_s"] for wave in waves),
        "peak": max(wave["peak"] for wave in waves),
    }


def ratios(batched: list[dict], baseline: list[dict]) -> list[float]:
    """Each round's tokens/s batched over one at a time (the waves of a round taken in turn)."""
    pairs = zip(batched, baseline, strict=True)
    return [ours["tokens_s"] / theirs["tokens_s"] for ours, theirs in pairs if theirs["tokens_s"]]


def percentile(values: list[float], q: int) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(rows: list[dict], baseline: list[dict], rounds: dict[int, list[float]], args, seconds: float) -> str:
    lone = next(row for row in rows if row["users"] == 1)
    lines = [
        f"### Visitors at once, {args.backend} backend, {args.label} (load.py, {time.strftime('%Y-%m-%d')})",
        "",
        f"{cpu_description()}, {args.threads} threads; {args.tokens}-token greedy answers, each visitor with their own "
        f"image, never asked about before; the app with `--slots {args.slots}` (answers decoded together) and, as "
        f"the baseline, `--slots 1` (one at a time), queue {QUEUE}, both running, each after a first wave of "
        f"{max(args.baseline_users)} not counted; the waves both were asked took turns (which app first alternating), "
        f"{args.rounds} rounds (tokens/s and the last answer: medians of the waves; × one at a time: median of the "
        f"rounds' ratios, their range in brackets); run took {seconds / 60:.1f} min.",
        "",
        "| slots | users | waves | answered | turned away | first word p50 / p95 | whole answer p50 / p95 "
        "| last answer | tokens/s (all) | × one at a time | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for slots, table in ((args.slots, rows), (1, baseline)):
        for row in table:
            ratio = rounds.get(row["users"]) if slots != 1 else None
            spread = f" ({min(ratio):.2f}–{max(ratio):.2f})" if ratio and len(ratio) > 1 else ""
            ratio = f"{statistics.median(ratio):.2f}×{spread}" if ratio else ""
            lines.append(
                f"| {slots} | {row['users']} | {row['waves']} | {row['answered']} | {row['refused']} "
                f"| {row['first_p50']:.1f} / {row['first_p95']:.1f} s "
                f"| {row['total_p50']:.1f} / {row['total_p95']:.1f} s "
                f"| {row['last']:.1f} s | {row['tokens_s']:.2f} | {ratio} | {row['peak'] / 1e9:.1f} GB |"
            )
    lost = sum(row["lost"] for row in rows + baseline)
    lines += [
        "",
        f"A lone answer took {lone['total_p50']:.1f} s (p50). "
        f"Requests lost (neither answered nor turned away): {lost}.",
    ]
    return "\n".join(lines) + "\n"


def new_images(folder: Path, count: int) -> list[Path]:
    """`count` random 640 × 480 pictures, none like any made before in `folder`."""
    made = len(list(folder.glob("visitor-*.png")))
    paths = [folder / f"visitor-{made + index}.png" for index in range(count)]
    for index, path in enumerate(paths):
        pixels = np.random.default_rng(made + index).integers(0, 255, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return paths


def main(argv: list[str] | None = None) -> dict[int, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="weights folder to serve")
    parser.add_argument("--whisper", type=Path, help="whisper .pt beside it")
    parser.add_argument("--demo", action="store_true", help="tiny random models built here (checks the script)")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8, 16, 8 + QUEUE + 8])
    parser.add_argument("--baseline-users", type=int, nargs="+", default=[1, 8], help="users for --slots 1 too")
    parser.add_argument("--rounds", type=int, default=3, help="rounds in which both apps take turns")
    parser.add_argument("--backend", default="torch", choices=["torch", "llama.cpp"], help="the app's backend")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="", help="what is served, for the heading (default: the folder)")
    parser.add_argument("--home", type=Path, help="HF_HOME for the app (its int8 cache); default: a temporary one")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from inference.config import Manifest
    from inference.loading import resolve_model_reference

    scratch = Path(tempfile.mkdtemp(prefix="load-"))
    if args.demo:
        from inference.tiny import build_demo_weights

        args.weights, args.whisper = build_demo_weights(scratch / "demo")
        args.label = args.label or "tiny random models"
    if args.weights is None or args.whisper is None:
        parser.error("give --weights and --whisper, or --demo")
    args.label = args.label or str(args.weights)
    home = args.home or scratch / "hf-home"
    home.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(args.weights)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_reference(args.weights, manifest.language_model))
    print(cpu_description(), flush=True)
    started = time.perf_counter()
    warm = max(args.baseline_users)
    with ExitStack() as stack:
        apps = {}
        for slots in (args.slots, 1):  # one after the other: the first to start saves the int8 file the other reads
            apps[slots] = stack.enter_context(
                running_app(args.weights, args.whisper, slots, args.threads, home, args.backend)
            )
            # A process's first answers set up kernels and fault in the memory its KV caches take, and the first
            # wave of many is slower for it: each app answers one, not counted, before the rounds.
            wave(*apps[slots], new_images(scratch, warm), warm, args.tokens, tokenizer)
        waves: dict[int, dict[int, list[dict]]] = {slots: {} for slots in apps}

        def ask(slots_and_users: list[tuple[int, int]]) -> None:
            # Images never seen before: an image asked about again would find its prompt's KV cached.
            images = new_images(scratch, max(users for _, users in slots_and_users))
            for slots, users in slots_and_users:
                result = wave(*apps[slots], images, users, args.tokens, tokenizer)
                shown = {key: value for key, value in result.items() if key not in ("firsts", "totals")}
                print(f"slots {slots}: {shown}", flush=True)
                waves[slots].setdefault(users, []).append(result)

        for round_ in range(args.rounds):
            for users in args.baseline_users:
                pair = [(args.slots, users), (1, users)]
                ask(pair if round_ % 2 == 0 else pair[::-1])
        for users in args.users:
            if users not in args.baseline_users:
                ask([(args.slots, users)])
    tables = {slots: [summary(waves[slots][users]) for users in sorted(waves[slots])] for slots in waves}
    rounds = {users: ratios(waves[args.slots][users], waves[1][users]) for users in waves[1]}
    text = report(tables[args.slots], tables[1], rounds, args, time.perf_counter() - started)
    print(text)
    write_section(text, f"### Visitors at once, {args.backend} backend", args.results)
    return tables


if __name__ == "__main__":
    main()
