"""CPU inference: the original project's method, this project's serving path and llama.cpp, in one run.

Random weights of phi-2's real shape (2.78B parameters; built on the meta device and filled in place,
no 2.7B-parameter init loop), written as microsoft/phi-2 ships (fp16, two shards and their index) with
the outliers of trained LLMs planted through the weights (`inference/standins.py`), a random LoRA,
TinyCLIP's vision tower and whisper base.en. Each method then runs in its own process (so peak memory
is its own) on the same weights and the served prompt (system prompt, template, 49 image embeddings
and a 40-token question) and generates 64 greedy tokens:

- original: fp32, LoRA merged, no KV cache (a full forward over the whole sequence per new token)
- fp32 / bf16 / int8: this project's `load_weights(precision=...)` and KV-cached `generate`
- llama.cpp-q8_0 / llama.cpp-q4_k_m: the language model exported by this project's GGUF writer
  (`inference/gguf_files.py`, LoRA merged) and run through llama-cpp-python's C API, fed the same
  token ids and image embeddings (the app's llama.cpp backend does the same)

Reported: load time and peak RSS while loading (int8: the whole app, Whisper and TinyCLIP included),
time to first token, decode tokens/s, the 64-token total, peak RSS while generating, greedy tokens
that match the original's, ratios to the original method and to the memory-bandwidth limit (measured
in each method's process right after its decode), teacher-forced agreement with fp32 (minimum logit
cosine over the answer positions that do not read an outlier-carrying token), the winner by the serving
rule (the fastest whole answer at minimum cosine ≥ 0.99), TinyCLIP's encode time, Whisper's time for a
10 s question, and what reusing the KV cache saves on a follow-up question. Then each backend's app
(`Assistant.load`) starts twice in fresh processes: the first start makes what it serves and saves it
(int8 model, GGUF export), the second loads it; time and peak RSS of each, and the first answer's first token. The CPU
and its instruction sets are printed.

    python benchmarks/cpu_inference.py            # phi-2: about 45 min
    python benchmarks/cpu_inference.py --small    # a 0.16B model of the same structure, a few minutes

The table is printed and written to benchmarks/RESULTS.md (replacing the previous run of the same mode).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.backends import Backend  # noqa: E402
from inference.dimensions import PHI_LORA_MODULES, TINYCLIP_61M, WHISPER_SIZES  # noqa: E402
from inference.measuring import RESULTS, TokenClock, bandwidth_gb_s, cpu_description, write_section  # noqa: E402

IMAGE_TOKENS = TINYCLIP_61M.num_patches
TEXT_TOKENS = 40
NEW_TOKENS = 64
TORCH_METHODS = ("original", "fp32", "bf16", "int8")
LLAMA_CPP_METHODS = ("llama.cpp-q8_0", "llama.cpp-q4_k_m")
METHODS = TORCH_METHODS + LLAMA_CPP_METHODS
MIN_COSINE = 0.99  # the int8 issue's rule: the fastest whole answer at least this faithful to fp32 wins


# ---------------------------------------------------------------- checkpoints (parent process)


def build_checkpoints(folder: Path, size: str) -> Path:
    """Random phi (bf16 safetensors, like the Hub's), a random LoRA, TinyCLIP, a weights folder, whisper."""
    import whisper
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionModel

    from inference.config import ProjectorType, TemplateName
    from inference.loading import new_manifest, save_weights
    from inference.projector import build_projector
    from inference.standins import plant_outliers, random_phi
    from inference.tiny import build_gpt2_tokenizer

    torch.manual_seed(0)
    model = random_phi(size)
    tokenizer = build_gpt2_tokenizer()
    outliers = plant_outliers(model, massive_tokens(tokenizer))
    (folder / "outliers.json").write_text(json.dumps(asdict(outliers)))
    # As microsoft/phi-2 ships: fp16, two shards and their index, the same tensor names.
    shard = 5_000_000_000 if size == "phi-2" else sum(p.numel() * 2 for p in model.parameters()) * 3 // 4
    model.save_pretrained(folder / "phi", max_shard_size=shard)
    tokenizer.save_pretrained(folder / "phi")
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PHI_LORA_MODULES))
    with torch.no_grad():  # a trained adapter's size: peft starts B at zero, training moves it a little
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 1e-3)
    CLIPVisionModel(TINYCLIP_61M.config()).save_pretrained(folder / "clip")
    manifest = new_manifest(
        "random weights of the real shapes",
        str(folder / "phi"),
        str(folder / "clip"),
        -2,
        ProjectorType.MLP2X_GELU,
        TemplateName.PHI2_CHAT,
        adapter=True,
    )
    save_weights(folder / "weights", manifest, build_projector(manifest.projector), lora)
    dims = WHISPER_SIZES["base.en"].dimensions()
    whisper_model = whisper.model.Whisper(dims)
    torch.save({"dims": vars(dims), "model_state_dict": whisper_model.state_dict()}, folder / "whisper.pt")
    return folder


# ---------------------------------------------------------------- one method (child process)


class RssSampler:
    """Samples this process's resident memory every 20 ms while active."""

    def __init__(self) -> None:
        self.peak = 0
        self.running = False

    def __enter__(self) -> RssSampler:
        self.running, self.peak = True, current_rss()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, current_rss())
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, current_rss())


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's resident high-water mark (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def prompt_ids(tokenizer) -> list[int]:
    """The served prompt: system prompt, template, the image's positions and a 40-token question."""
    from inference.config import TemplateName
    from inference.prompt import Conversation, Turn, render

    words = tokenizer("Describe the scene in this photograph in detail, please. " * 8)["input_ids"][:TEXT_TOKENS]
    question = tokenizer.decode(words)
    conversation = Conversation((Turn(question),))
    return render(TemplateName.PHI2_CHAT, conversation, tokenizer, True, image_tokens=IMAGE_TOKENS).input_ids


def massive_tokens(tokenizer) -> list[int]:
    """Where trained LLMs put massive activations: the prompt's first token and "\n"."""
    return sorted({prompt_ids(tokenizer)[0], *tokenizer("\n")["input_ids"]})


def speeds(start: float, times: list[float]) -> dict[str, float]:
    """First token, decode rate and whole answer, from the generation's start and each token's arrival."""
    return {
        "first_s": times[0] - start,
        "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
        "total_s": times[-1] - start,
    }


def random_image_embeds(width: int) -> torch.Tensor:
    """The image's 49 embeddings, the same for every method (the projector's output is not under test)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, IMAGE_TOKENS, width, generator=generator) * 0.02


def weight_bytes(language_model) -> int:
    """Bytes of weights read per decoded token: every Linear (int8: packed) and one embedding row."""
    total = 0
    for module in language_model.modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            total += module.in_features * module.out_features  # 1 byte each (scales are negligible)
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, torch.nn.LayerNorm):
            total += module.weight.numel() * 2 * module.weight.element_size()
    return total


def run_method(method: str, folder: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    from inference.config import GenerationOptions
    from inference.loading import load_weights
    from inference.precision import Precision

    start = time.perf_counter()
    precision = Precision.FP32 if method == "original" else Precision(method)
    loaded = load_weights(folder / "weights", precision=precision)
    transcriber = None
    if method == "int8":  # the served app: Whisper too
        from inference.speech import Transcriber

        transcriber = Transcriber(str(folder / "whisper.pt"))
    load_seconds = time.perf_counter() - start
    load_peak = peak_rss()
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = prompt_ids(tokenizer)
    image_embeds = random_image_embeds(model.language_model.config.hidden_size).to(model.embedding_dtype)
    result = {
        "method": method,
        "prompt_positions": len(ids),
        "prompt_last": ids[-1],
        "load_s": load_seconds,
        "load_peak": load_peak,
        "weights": weight_bytes(model.language_model),
    }
    with RssSampler() as rss:
        start = time.perf_counter()
        if method == "original":
            tokens, times = [], []
            embeds = model.build_inputs([ids], image_embeds).inputs_embeds
            embed_tokens = model.language_model.get_input_embeddings()
            with torch.no_grad():
                for _ in range(NEW_TOKENS):
                    logits = model.language_model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
                    token = int(logits.argmax())
                    tokens.append(token)
                    times.append(time.perf_counter())
                    embeds = torch.cat([embeds, embed_tokens(torch.tensor([[token]]))], dim=1)
        else:
            clock = TokenClock()
            options = GenerationOptions(max_new_tokens=NEW_TOKENS)
            tokens = model.generate(ids, image_embeds, options, streamer=clock)
            times = clock.times
    # Quality against the original's (fp32) tokens, teacher-forced so that errors do not compound; the
    # original runs first and leaves its tokens for the others.
    reference = folder / "tokens-original.json"  # the first method's tokens: the original's (--served: fp32's)
    if not reference.exists():
        reference.write_text(json.dumps(tokens))
    forced = json.loads(reference.read_text())
    with torch.no_grad():
        inputs = model.build_inputs([ids + forced], image_embeds)
        logits = model.language_model(inputs_embeds=inputs.inputs_embeds).logits[0, -len(forced) - 1 : -1].float()
    np.save(folder / f"logits-{method}.npy", logits.numpy())
    result |= speeds(start, times) | {"tokens": tokens, "generate_peak": rss.peak}
    if method == "int8":
        result |= extras(model, loaded, transcriber, ids)
    return result


def extras(model, loaded, transcriber, ids) -> dict:
    """TinyCLIP encode, Whisper on a 10 s question, and a follow-up question with and without KV reuse."""
    import whisper
    from PIL import Image

    from inference.config import GenerationOptions
    from inference.model import PrefixCache
    from inference.prompt import Conversation, Turn, render
    from inference.vision import preprocess

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    start = time.perf_counter()
    embeds = model.encode_images(preprocess([image], model.vision_tower.image_size))
    encode_s = time.perf_counter() - start
    samples = (np.random.default_rng(1).standard_normal(16000 * 10) * 0.1).astype(np.float32)
    start = time.perf_counter()
    audio = whisper.pad_or_trim(torch.from_numpy(samples))
    mel = whisper.log_mel_spectrogram(audio, n_mels=transcriber.model.dims.n_mels)
    options = whisper.DecodingOptions(language="en", fp16=False, without_timestamps=True, sample_len=30)
    whisper.decode(transcriber.model, mel, options)  # ~30 tokens: a 10 s question
    whisper_s = time.perf_counter() - start

    def prompt(*turns: Turn) -> list[int]:
        manifest = loaded.manifest
        conversation = Conversation(turns)
        return render(
            manifest.template, conversation, loaded.tokenizer, True, image_tokens=manifest.image_tokens
        ).input_ids

    class CountingPrefixCache(PrefixCache):
        reused = 0  # positions the last `take` handed back already computed

        def take(self, input_ids, image_key):
            cache = super().take(input_ids, image_key)
            self.reused = 0 if cache is None else cache.get_seq_length()
            return cache

    short = GenerationOptions(max_new_tokens=32)
    prefixes = CountingPrefixCache()
    first = prompt(Turn("What is in this picture?"))
    answer = loaded.tokenizer.decode(model.generate(first, embeds, short, prefixes=prefixes, image_key="x"))
    follow_up = prompt(Turn("What is in this picture?", answer), Turn("And what colour is it?"))
    timings = {}
    for name, store in (("without", None), ("with", prefixes)):
        clock = TokenClock()
        start = time.perf_counter()
        model.generate(follow_up, embeds, GenerationOptions(max_new_tokens=1), clock, None, store, "x")
        timings[name] = clock.times[0] - start
    return {
        "clip_encode_s": encode_s,
        "whisper_10s_s": whisper_s,
        "follow_up_first_s_without_reuse": timings["without"],
        "follow_up_first_s_with_reuse": timings["with"],
        "follow_up_positions": len(follow_up),
        "reused_positions": prefixes.reused,
    }


# ---------------------------------------------------------------- llama.cpp


def export_llama_cpp(folder: Path, methods: list[str]) -> None:
    """The weights folder's language model, LoRA merged in fp32, as GGUF by this project's exporter
    (`inference/gguf_files.py`, what the app serves): Q8_0 by the gguf package, Q4_K_M by llama.cpp."""
    from inference.gguf_files import export

    for method in methods:
        kind = method.removeprefix("llama.cpp-")
        export(folder / "weights", folder / "gguf" / kind, kind).language_model.rename(folder / f"{kind}.gguf")


def run_llama_cpp(method: str, folder: Path, threads: int) -> dict:
    """The language model alone in llama.cpp, on the same prompt and image embeddings as the torch methods."""
    from transformers import AutoTokenizer

    from inference.backends.llamacpp import LlamaCpp

    path = folder / f"{method.removeprefix('llama.cpp-')}.gguf"
    start = time.perf_counter()
    llm = LlamaCpp(path, threads)
    result = {"method": method, "load_s": time.perf_counter() - start, "load_peak": peak_rss()}
    result["weights"] = path.stat().st_size
    ids = prompt_ids(AutoTokenizer.from_pretrained(folder / "phi"))
    image_embeds = random_image_embeds(llm.width)[0].numpy()
    with RssSampler() as rss:
        start = time.perf_counter()
        logits = llm.decode(ids, image_embeds, 0)
        tokens, times = [], []
        for step in range(NEW_TOKENS):
            tokens.append(int(logits.argmax()))
            times.append(time.perf_counter())
            if step < NEW_TOKENS - 1:
                logits = llm.decode([tokens[-1]], image_embeds, len(ids) + step)
    forced = json.loads((folder / "tokens-original.json").read_text())
    llm.clear()
    every = llm.decode(ids + forced, image_embeds, 0, outputs="all")
    np.save(folder / f"logits-{method}.npy", every[len(ids) - 1 : -1])
    return result | speeds(start, times) | {"tokens": tokens, "generate_peak": rss.peak}


APP_BACKENDS = (Backend.LLAMA_CPP, Backend.TORCH)


def run_app_start(folder: Path, threads: int, backend: str) -> dict:
    """The app's start (`Assistant.load`, as app.py calls it: TinyCLIP, the projector, Whisper and
    the language model; llama.cpp: exported to Q8_0 once into the cache; torch: int8, quantized once
    and saved into the cache), and its first answer's first token."""
    from PIL import Image

    from inference.assistant import Assistant
    from inference.config import GenerationOptions

    start = time.perf_counter()
    assistant = Assistant.load(
        folder / "weights",
        whisper_model=str(folder / "whisper.pt"),
        backend=backend,
        cache=folder / "app-cache",
        threads=threads,
    )
    result = {"start_s": time.perf_counter() - start, "start_peak": peak_rss()}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    start = time.perf_counter()
    list(assistant.chat([], image, text="What is in this picture?", options=GenerationOptions(max_new_tokens=1)))
    return result | {"first_answer_s": time.perf_counter() - start, "peak": peak_rss()}


# ---------------------------------------------------------------- the app as served, per CPU class (--served)


def cpu_classes() -> dict[str, dict[str, str]]:
    """Kernel classes measurable here: the CPU's own; and the AVX2 class where the CPU has more than AVX2."""
    from inference.measuring import AVX2_KERNELS, cpu_model_and_flags

    classes: dict[str, dict[str, str]] = {"native": {}}
    if "avx512f" in cpu_model_and_flags()[1]:
        classes["avx2"] = AVX2_KERNELS
    return classes


# About 10 s spoken: what a 10 s recording's 30 whisper tokens say.
SPOKEN_QUESTION = (
    "Could you tell me what the people in this picture are doing, what colour the car on the left is, "
    "and whether it looks like it is about to rain?"
)


def first_token_s(assistant, image, options, **question) -> tuple[float, list[float]]:
    """Seconds from asking (`Assistant.chat`, as the app calls it) to the answer's first text, and each later
    reply's arrival."""
    start, arrivals = time.perf_counter(), []
    for reply in assistant.chat([], image, options=options, **question):
        if reply.answer:
            arrivals.append(time.perf_counter())
    return arrivals[0] - start, arrivals


def run_served(folder: Path, threads: int, cache: Path, first: bool) -> dict:
    """The app's start (`Assistant.load`, torch int8) and, after the second start, what a visitor waits for."""
    import dataclasses
    import functools

    import whisper
    from PIL import Image

    from inference.assistant import Assistant
    from inference.config import GenerationOptions

    start = time.perf_counter()
    whisper_model = str(folder / "whisper.pt")
    assistant = Assistant.load(folder / "weights", whisper_model=whisper_model, cache=cache, threads=threads)
    result = {"start_s": time.perf_counter() - start, "start_peak": peak_rss()}
    if first:
        return result
    # Random weights never stop a transcript and hear no words: decode as many tokens as a 10 s question has
    # (about 30), and hand on the text of such a question, so that the language model reads what it would.
    whisper.DecodingOptions = functools.partial(whisper.DecodingOptions, sample_len=30)
    decode = whisper.decode
    whisper.decode = lambda *args, **kwargs: dataclasses.replace(decode(*args, **kwargs), text=SPOKEN_QUESTION)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(13)]
    speech = (rng.standard_normal(16000 * 10) * 0.1).astype(np.float32)
    one = GenerationOptions(max_new_tokens=1)
    question = {"typed": {"text": "What is in this picture?"}, "spoken": {"audio": (16000, speech)}}
    result["first_question_s"] = first_token_s(assistant, images[0], one, **question["typed"])[0]
    for index, (kind, read) in enumerate([(kind, read) for read in (False, True) for kind in question]):
        times = []
        for image in images[1 + 3 * index : 4 + 3 * index]:
            if read:  # uploaded before the question: the app reads it while the question is typed or spoken
                assistant.look(image)
            times.append(first_token_s(assistant, image, one, **question[kind])[0])
        result[f"{kind}{'_read' * read}_s"] = float(np.median(times))
    start = time.perf_counter()
    assistant.transcriber((16000, speech))
    result["whisper_s"] = time.perf_counter() - start
    clock, model = TokenClock(), assistant.backend.model
    image_embeds = random_image_embeds(model.language_model.config.hidden_size).to(model.embedding_dtype)
    ids = prompt_ids(assistant.tokenizer)
    assistant.backend.generate(ids, image_embeds, GenerationOptions(max_new_tokens=NEW_TOKENS), clock, image_key="x")
    result["decode_tok_s"] = speeds(0.0, clock.times)["decode_tok_s"]
    result["peak"] = peak_rss()
    np.save(folder / f"logits-{cache.name}.npy", served_logits(assistant, folder))
    return result


@torch.no_grad()
def served_logits(assistant, folder: Path) -> np.ndarray:
    """Teacher-forced logits on the reference tokens as the app computes them: after the system prompt's KV
    cache, computed at start (`Assistant.warm`), the rest of the prompt in one pass."""
    model, tokenizer = assistant.backend.model, assistant.tokenizer
    ids, forced = prompt_ids(tokenizer), json.loads((folder / "tokens-original.json").read_text())
    image_embeds = random_image_embeds(model.language_model.config.hidden_size).to(model.embedding_dtype)
    cache = assistant.backend.prefixes.take(ids + forced, "benchmark")
    embeds = model.build_inputs([ids + forced], image_embeds).inputs_embeds[:, cache.get_seq_length() :]
    logits = model.language_model(inputs_embeds=embeds, cache=cache).logits[0]
    return logits[-len(forced) - 1 : -1].float().numpy()


def served(args, folder: Path, env: dict[str, str]) -> str:
    """fp32's tokens and logits, then per CPU class the app's two starts and its answers' timings."""
    results, started = {}, time.perf_counter()
    print("running fp32 (the reference) ...", flush=True)
    results["fp32"] = child(["--child", "fp32"], folder, args.threads, env)
    for name, kernels in cpu_classes().items():
        for start in ("first", "second"):
            print(f"starting the app ({name} kernels, {start} start) ...", flush=True)
            extra = ["--child", "served", "--cache", str(folder / f"served-{name}")] + ["--first"] * (start == "first")
            results.setdefault(name, {})[start] = child(extra, folder, args.threads, env | kernels)
    reference = results["fp32"]
    classes = [name for name in results if name != "fp32"]
    scores = quality(folder, [f"served-{c}" for c in classes], reference["tokens"], reference["prompt_last"], "fp32")
    return served_report(results, scores, args.threads, time.perf_counter() - started)


def child(extra: list[str], folder: Path, threads: int, env: dict[str, str], what: str = "") -> dict:
    """This script's `--child` run in a fresh process (its peak memory is its own); the JSON it prints last."""
    command = [sys.executable, __file__, *extra, "--folder", str(folder), "--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{what or ' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


SERVED_TARGETS = {  # issue 28's aims: (AVX2 class, VNNI/AMX class)
    "typed_s": (2.5, 1.0),
    "spoken_s": (3.5, 1.5),
}


def served_report(results: dict, scores: dict, threads: int, seconds: float) -> str:
    from inference.measuring import AVX2_KERNELS

    lines = [
        f"### The app as served, phi-2 shape ({time.strftime('%Y-%m-%d')})",
        "",
        f"`python benchmarks/cpu_inference.py --served` on {cpu_description()}, {os.cpu_count()} cores, {threads} "
        f"threads; the whole run took {seconds / 60:.1f} min. Each row is one CPU class on this machine: native (its "
        f"own kernels) and avx2 ({' '.join(f'{k}={v}' for k, v in AVX2_KERNELS.items())}: the kernels an AVX2-only "
        "CPU runs, at this machine's clock and memory). The app (`Assistant.load` as app.py calls it, torch int8, "
        "whisper base.en and TinyCLIP) starts from the fp16 shards (first start: quantizes and saves the int8 model), "
        "then again from what it saved (second start), each in a fresh process.",
        "",
        "After the second start, each question about a new 640×480 image, through `Assistant.chat` as the app asks "
        "(medians of 3): first question after start; typed and spoken → first token, asked with the upload, and "
        "asked after the app read the upload (`Assistant.look`, which the app runs while the question is typed or "
        "spoken); a spoken question is a 10 s recording transcribed to 30 tokens, read as a question of that length "
        f"({len(SPOKEN_QUESTION.split())} words); whisper alone on that recording; "
        "decode rate of a 64-token answer; and the served model's teacher-forced logits (the system prompt's KV from "
        "the start, the rest in one pass) against fp32's on fp32's 64 greedy tokens, at the positions whose input "
        "carries no planted outlier.",
        "",
        "| CPU class | first start | peak RSS | second start | peak RSS | first question | typed → first token "
        "(with upload / read) | spoken → first token (with upload / read) | whisper | decode | logit cosine (min) "
        "| top-1 | peak RSS in all |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in (n for n in results if n != "fp32"):
        first, second = results[name]["first"], results[name]["second"]
        agreement, cosine = scores[f"served-{name}"][:2]
        lines.append(
            f"| {name} | {first['start_s']:.1f} s | {gb(first['start_peak'])} | {second['start_s']:.1f} s | "
            f"{gb(second['start_peak'])} | {second['first_question_s']:.2f} s | {second['typed_s']:.2f} s / "
            f"{second['typed_read_s']:.2f} s | {second['spoken_s']:.2f} s / {second['spoken_read_s']:.2f} s | "
            f"{second['whisper_s']:.2f} s | {second['decode_tok_s']:.2f} tok/s | "
            f"{cosine:.4f} | {agreement:.0%} | {gb(second['peak'])} |"
        )
    (avx2_typed, vnni_typed), (avx2_spoken, vnni_spoken) = SERVED_TARGETS["typed_s"], SERVED_TARGETS["spoken_s"]
    lines += [
        "",
        f"Aims (issue 28): typed ≤ {avx2_typed} s on the AVX2 class, ≤ {vnni_typed} s with VNNI/AMX; spoken ≤ "
        f"{avx2_spoken} s / ≤ {vnni_spoken} s; second start ≤ 15 s; every peak ≤ 6.5 GB; logit cosine ≥ {MIN_COSINE}.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- report


def gb(value: float) -> str:
    return f"{value / 1e9:.1f} GB"


def quality(
    folder: Path, methods: list[str], original_tokens: list[int], prompt_last: int, reference: str = "original"
) -> dict[str, tuple]:
    """Per method, teacher-forced on the original's tokens: top-1 agreement with them, min logit cosine and max
    logit error / logit range against fp32 (`reference`'s logits), over the answer positions whose input is not an
    outlier-carrying token (the prompt's first token and "\n" carry the planted massive activation)."""
    reference = torch.from_numpy(np.load(folder / f"logits-{reference}.npy"))
    massive = set(json.loads((folder / "outliers.json").read_text())["massive_tokens"])
    inputs = [prompt_last, *original_tokens[:-1]]  # the token each scored position reads
    keep = torch.tensor([token not in massive for token in inputs])
    span = (reference.max() - reference.min()).item()
    scores = {}
    for method in methods:
        logits = torch.from_numpy(np.load(folder / f"logits-{method}.npy")).float()
        logits, ref = logits[keep], reference[keep]
        agreement = (logits.argmax(-1) == torch.tensor(original_tokens)[keep]).float().mean().item()
        cosine = torch.nn.functional.cosine_similarity(logits, ref, dim=-1).min().item()
        scores[method] = (agreement, cosine, (logits - ref).abs().max().item() / span, int(keep.sum()))
    return scores


def winner(results: dict[str, dict], scores) -> str | None:
    """The fastest whole answer (first token + 64 tokens) among the methods at least MIN_COSINE faithful."""
    faithful = [method for method in results if method != "original" and scores[method][1] >= MIN_COSINE]
    return min(faithful, key=lambda method: results[method]["total_s"]) if faithful else None


def report(results: dict[str, dict], size: str, threads: int, seconds: float, scores, notes) -> str:
    original = results["original"]
    reads = [r["bandwidth"] for r in results.values()]
    lines = [
        f"### CPU inference, {size} shape ({time.strftime('%Y-%m-%d')})",
        "",
        f"`python benchmarks/cpu_inference.py{' --small' if size == 'small' else ''}` on {cpu_description()}, "
        f"{os.cpu_count()} cores, {threads} threads; the served prompt ({results['int8']['prompt_positions']} "
        f"positions: system prompt, template, {IMAGE_TOKENS} image positions, a {TEXT_TOKENS}-token question) → "
        f"{NEW_TOKENS} greedy tokens; read bandwidth {min(reads):.1f}–{max(reads):.1f} GB/s (each method's limit: "
        f"its weights over the bandwidth read in its process right after its decode); "
        f"the whole run took {seconds / 60:.1f} min.",
        "",
        "The checkpoint is written as microsoft/phi-2 ships (fp16, two shards and their index) with outliers planted "
        f"through the weights (`inference/standins.py`): {notes['outliers']}.",
        "",
        "| method | load | peak RSS loading | first token | decode | 64 tokens | × original | "
        "bandwidth limit | decode / limit | peak RSS generating | same tokens | top-1 agreement | "
        "logit cosine (min) | max logit error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        limit = r["bandwidth"] * 1e9 / r["weights"]
        same = next(
            (i for i, (a, b) in enumerate(zip(r["tokens"], original["tokens"], strict=True)) if a != b), NEW_TOKENS
        )
        lines.append(
            f"| {method} | {r['load_s']:.1f} s | {gb(r['load_peak'])} | {r['first_s']:.2f} s | "
            f"{r['decode_tok_s']:.2f} tok/s | {r['total_s']:.1f} s | {original['total_s'] / r['total_s']:.1f}× | "
            f"{limit:.1f} tok/s | {r['decode_tok_s'] / limit:.0%} | {gb(r['generate_peak'])} | {same}/{NEW_TOKENS} | "
            f"{scores[method][0]:.0%} | {scores[method][1]:.4f} | {scores[method][2]:.1%} |"
        )
    best = winner(results, scores)
    lines += [
        "",
        f"**Fastest whole answer at logit cosine ≥ {MIN_COSINE}: {best or 'none'}**"
        + (f" ({results[best]['total_s']:.1f} s for the first token and {NEW_TOKENS} tokens)." if best else "."),
        *notes.get("lines", []),
    ]
    lines += [
        "",
        "Same tokens: leading greedy tokens identical to the original's (fp32). Top-1 agreement, logit cosine and",
        "error (relative to fp32's logit range) are measured teacher-forced on the original's tokens, at the",
        f"{next(iter(scores.values()))[3]} of {NEW_TOKENS} answer positions whose input is not an outlier-carrying"
        " token. Random weights give nearly flat logits, so free-running agreement understates every precision here;",
        "tests/test_precision.py measures it on a trained tiny model. llama.cpp runs the language model alone",
        "(through its C API, fed the same token ids and image embeddings); its load and memory do not include",
        "TinyCLIP and Whisper, and its weights column is the GGUF file's size.",
    ]
    if "app" in notes:
        lines += [
            "",
            "The app's start from these fp16 shards (Assistant.load, as app.py calls it: TinyCLIP, the "
            "projector, whisper base.en and the language model), each in a fresh process: the first start makes what "
            "the backend serves and keeps it in its cache (llama.cpp: the Q8_0 export; torch: the int8 model), the "
            "second loads it; then the first answer's first token (a 640×480 image encoded, one token).",
            "",
            "| backend | first start | peak RSS | second start | peak RSS | first answer, first token | "
            "peak RSS in all |",
            "|---|---|---|---|---|---|---|",
        ]
        for backend, starts in notes["app"].items():
            first, second = starts["first"], starts["second"]
            lines.append(
                f"| {backend} | {first['start_s']:.1f} s | {gb(first['start_peak'])} | {second['start_s']:.1f} s | "
                f"{gb(second['start_peak'])} | {second['first_answer_s']:.2f} s | {gb(second['peak'])} |"
            )
    extra = results["int8"]
    saved = 1 - extra["follow_up_first_s_with_reuse"] / extra["follow_up_first_s_without_reuse"]
    lines += [
        "",
        "int8 is the torch backend's app (`--backend torch`; whisper base.en and TinyCLIP loaded too; its load is "
        "a first start, without the saved int8 model). "
        f"TinyCLIP encode of one 640×480 image: {extra['clip_encode_s']:.2f} s; "
        f"whisper base.en on a 10 s question (30 tokens): {extra['whisper_10s_s']:.2f} s. "
        f"Follow-up question ({extra['follow_up_positions']} positions): first token "
        f"{extra['follow_up_first_s_without_reuse']:.2f} s computing the whole prompt, "
        f"{extra['follow_up_first_s_with_reuse']:.2f} s reusing the previous turn's KV cache "
        f"({extra['reused_positions']} positions reused, {saved:.0%} saved).",
        "",
    ]
    return "\n".join(lines)


def llama_cpp_problem() -> str | None:
    """Why llama.cpp cannot be measured here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install -c constraints.txt -r requirements.txt)"
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a 0.16B model of phi's structure (about a minute)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU Basic has 2 vCPUs)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: all that can run here")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file the table is written to")
    parser.add_argument(
        "--served",
        action="store_true",
        help="only the app as served, on each CPU class this machine can run (starts, typed and spoken first "
        "token, fidelity against fp32): about 15 min for phi-2",
    )
    parser.add_argument(
        "--child", choices=[*METHODS, *(f"app-start-{b}" for b in APP_BACKENDS), "served"], help=argparse.SUPPRESS
    )
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--first", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "served":
        print(json.dumps(run_served(args.folder, args.threads, args.cache, args.first)))
        return {}
    if args.child and args.child.startswith("app-start-"):
        print(json.dumps(run_app_start(args.folder, args.threads, args.child.removeprefix("app-start-"))))
        return {}
    if args.child:
        run = run_llama_cpp if args.child in LLAMA_CPP_METHODS else run_method
        result = run(args.child, args.folder, args.threads)
        # The limit is read right after the decode it bounds: the memory's speed changes from minute to minute.
        print(json.dumps(result | {"bandwidth": bandwidth_gb_s(args.threads)}))
        return {}
    problem = llama_cpp_problem()
    methods = args.methods or list(TORCH_METHODS if problem else METHODS)
    if methods[0] != "original" or "int8" not in methods:
        parser.error("--methods must start with original (the baseline) and include int8 (the served path)")
    if problem and set(methods) & set(LLAMA_CPP_METHODS):
        parser.error(problem)
    size = "small" if args.small else "phi-2"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}  # each child's
    if args.served:
        with tempfile.TemporaryDirectory(prefix="cpu-inference-") as tmp:
            print(f"building random checkpoints of the {size} shape in {tmp} ...", flush=True)
            build_checkpoints(Path(tmp), size)
            os.sync()
            table = served(args, Path(tmp), env).replace("phi-2 shape", f"{size} shape")
        print(table)
        write_section(table, f"### The app as served, {size} shape", args.results)
        return {}
    started = time.perf_counter()
    results, notes = {}, {"lines": [f"llama.cpp not measured: {problem}."] if problem else []}
    with tempfile.TemporaryDirectory(prefix="cpu-inference-") as tmp:
        folder = Path(tmp)
        print(f"building random checkpoints of the {size} shape in {tmp} ...", flush=True)
        build_checkpoints(folder, size)
        outliers = json.loads((folder / "outliers.json").read_text())
        notes["outliers"] = (
            f"LayerNorm outputs ×{outliers['scale']:.0f} in dimensions {outliers['dims']} (the Linear inputs "
            f"that read them ÷{outliers['scale']:.0f}), and {outliers['massive_value']:.2f} (1000× the median) in "
            f"residual dimension {outliers['massive_dim']} at tokens {outliers['massive_tokens']} "
            '(the prompt\'s first token and "\\n")'
        )
        if set(methods) & set(LLAMA_CPP_METHODS):
            print("exporting GGUF (training.export_gguf's writer) ...", flush=True)
            start = time.perf_counter()
            export_llama_cpp(folder, [m for m in methods if m in LLAMA_CPP_METHODS])
            notes["lines"].append(f"GGUF export (merge, convert, quantize): {time.perf_counter() - start:.0f} s.")
        os.sync()  # the checkpoint's gigabytes are written back now, not during a measurement
        for method in methods:
            print(f"running {method} ...", flush=True)
            results[method] = child(["--child", method], folder, args.threads, env, method)
        scores = quality(folder, methods, results["original"]["tokens"], results["original"]["prompt_last"])
        backends = [b for b in APP_BACKENDS if set(methods) & set(LLAMA_CPP_METHODS if b == "llama.cpp" else ["int8"])]
        for backend in backends:  # the app's first start makes what it serves and keeps it; the second loads it
            for name in ("first", "second"):
                print(f"starting the app ({backend}, {name} start) ...", flush=True)
                what = f"the app's {name} start ({backend})"
                started_app = child(["--child", f"app-start-{backend}"], folder, args.threads, env, what)
                notes.setdefault("app", {}).setdefault(backend, {})[name] = started_app
    table = report(results, size, args.threads, time.perf_counter() - started, scores, notes)
    print(table)
    write_section(table, f"### CPU inference, {size} shape", args.results)
    return results


if __name__ == "__main__":
    main()
