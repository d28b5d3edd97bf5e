"""Text corpora → packed uint16 token shards for pretraining, memory-mapped by `training.pretrain`.

The original project's corpus, a 100 MB RedPajama sample of 80 % CommonCrawl and 20 % C4:
    python -m training.prepare_text --source cc=data/redpajama/common_crawl --source c4=data/redpajama/c4 \
        --weights cc=0.8 c4=0.2 --out data/pretrain
Online, files straight from a Hub dataset repo (any that holds .jsonl or .parquet files):
    python -m training.prepare_text --source c4=hf:OWNER/NAME:c4*.jsonl --out data/pretrain

A source is `NAME=WHERE` (or just `WHERE`), given once or more per name. WHERE is a file, a folder
(searched recursively) or `hf:OWNER/NAME[:PATTERN]`, a Hub dataset repo whose files matching the
pattern are downloaded. Files: `.txt` (the whole file is one document), `.jsonl` (one document per
line, in its --text-field), `.parquet` (the --text-field column); `.txt.gz` and `.jsonl.gz` too.

Every document is tokenised (phi's tokenizer by default) and followed by `<|endoftext|>`; documents are
packed end to end, with no padding, as uint16 ids. With --weights each source gives that share of the
tokens, so the corpus is as large as its scarcest source allows (or --max-tokens); without, every
document is used. Whole documents, drawn in a seeded random order, go either to the held-out shard
(`val.bin`, --held-out of each source's tokens, so it has the training mixture) or to the training
shards (`train-00000.bin`, ..., --shard-tokens each), interleaved across sources; a source whose
documents are all longer than its held-out share has those tokens cut from the head of one. `meta.json`, written
last, describes the result; training refuses a folder without it.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from inference.cli import ArgumentParser, command
from inference.config import atomic_write_text
from training.data import DataError
from training.text_shards import (
    FORMAT,
    HELD_OUT_FILE,
    HUB_PREFIX,
    MAX_VOCAB,
    META,
    TOKEN_DTYPE,
    TRAIN_PATTERN,
    PackedWriter,
    open_tokenizer,
    plan_mixture,
    read_documents,
    source_files,
    split_held_out,
    take_documents,
)

PHI_TOKENIZER = "microsoft/phi-1_5"  # GPT-2's BPE (50,257 ids) plus phi's added tokens
TOKENIZE_BATCH = 512  # documents per tokenizer call: the fast tokenizer works through a call in parallel
SOURCE_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


# --- tokenising -----------------------------------------------------------------------------------


@dataclass
class SourceTokens:
    """One source tokenised into a scratch file: its documents' token counts, end-of-text included."""

    name: str
    where: list[str]
    files: list[Path]
    hub_dataset: str | None
    path: Path
    lengths: np.ndarray
    skipped: Counter = field(default_factory=Counter)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)


def tokenize_source(
    name: str,
    where: list[str],
    files: list[Path],
    hub_dataset: str | None,
    tokenizer: PreTrainedTokenizerBase,
    text_field: str,
    scratch: Path,
) -> SourceTokens:
    """Tokenise every document of a source, each followed by end-of-text, into `scratch/NAME.bin`."""
    eos = tokenizer.eos_token_id
    skipped: Counter = Counter()
    lengths: list[int] = []
    path = scratch / f"{name}.bin"
    progress = tqdm(desc=f"tokenising {name}", unit="doc")
    with open(path, "wb") as out:

        def flush(batch: list[str]) -> None:
            encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
            for ids in encoded["input_ids"]:
                out.write(np.asarray([*ids, eos], dtype=TOKEN_DTYPE).tobytes())
                lengths.append(len(ids) + 1)
            progress.update(len(batch))

        batch: list[str] = []
        for file in files:
            for text in read_documents(file, text_field, skipped):
                if not text.strip():
                    skipped["empty document"] += 1
                    continue
                batch.append(text)
                if len(batch) == TOKENIZE_BATCH:
                    flush(batch)
                    batch = []
        if batch:
            flush(batch)
    progress.close()
    if not lengths:
        reasons = "; ".join(f"{count} × {reason}" for reason, count in skipped.most_common(3)) or "no records"
        raise DataError(f"source {name!r} has no documents ({reasons})")
    return SourceTokens(name, where, files, hub_dataset, path, np.asarray(lengths, dtype=np.int64), skipped)


# --- mixing and writing ---------------------------------------------------------------------------


def write_corpus(
    sources: list[SourceTokens],
    quotas: dict[str, int],
    out: Path,
    held_out: float,
    shard_tokens: int,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, dict[str, int]]]:
    """Write the training shards and the held-out shard; returns (shards, held-out shard, per-source counts)."""
    rng = np.random.default_rng(seed)
    maps = {source.name: np.memmap(source.path, dtype=TOKEN_DTYPE, mode="r") for source in sources}
    starts = {source.name: source.starts for source in sources}
    counts: dict[str, dict[str, int]] = {}
    held_out_docs, train_docs = [], []
    for number, source in enumerate(sources):
        chosen = take_documents(source.lengths, quotas[source.name], rng)
        evaluation, training = split_held_out(source.lengths, chosen, held_out)
        held_out_docs += [(number, *piece) for piece in evaluation]
        train_docs += [(number, *piece) for piece in training]
        counts[source.name] = {
            "documents_used": len(chosen),
            "train_tokens": sum(end - first for _, first, end in training),
            "held_out_tokens": sum(end - first for _, first, end in evaluation),
        }
    # Training documents interleaved across sources, so that every stretch of the stream has the mixture.
    train_docs = [train_docs[i] for i in rng.permutation(len(train_docs))]

    def write(documents: list[tuple[int, int, int, int]], writer: PackedWriter, label: str) -> list[dict[str, Any]]:
        for number, index, first, end in tqdm(documents, desc=f"writing {label}", unit="doc"):
            source = sources[number]
            start = starts[source.name][index]
            writer.add(maps[source.name][start + first : start + end])
        return writer.close()

    held_out_shards = write(held_out_docs, PackedWriter(out, HELD_OUT_FILE, shard_tokens=2**62), "held-out")
    held_out_shard = held_out_shards[0] if held_out_shards else {"file": None, "tokens": 0}
    shards = write(train_docs, PackedWriter(out, TRAIN_PATTERN, shard_tokens), "train")
    return shards, held_out_shard, counts


# --- the command ----------------------------------------------------------------------------------


def parse_sources(specs: Sequence[str]) -> dict[str, list[str]]:
    """`NAME=WHERE` or `WHERE` specs → {name: [where, ...]} in first-seen order."""
    sources: dict[str, list[str]] = {}
    for spec in specs:
        name, separator, where = spec.partition("=")
        if not (separator and SOURCE_NAME.match(name)):  # no name given: named after the file or folder
            where = spec
            name = Path(spec.removeprefix(HUB_PREFIX).split(":")[0]).name.split(".")[0]
            if not SOURCE_NAME.match(name):
                raise DataError(f"cannot name the source {spec!r}; give it as NAME={spec}")
        sources.setdefault(name, []).append(where)
    return sources


def parse_weights(specs: Sequence[str] | None, names: Sequence[str]) -> dict[str, float] | None:
    """`NAME=WEIGHT` specs, one per source, → {name: weight}; None when no weights were given."""
    if not specs:
        return None
    weights: dict[str, float] = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise DataError(f"--weights {spec!r}: expected NAME=NUMBER") from None
        if weights[name] < 0 or not math.isfinite(weights[name]):
            raise DataError(f"--weights {spec!r}: a weight must be a finite number ≥ 0")
    if set(weights) != set(names):
        raise DataError(f"--weights names {sorted(weights)} must be exactly the sources {sorted(names)}")
    if sum(weights.values()) <= 0:
        raise DataError("--weights: at least one weight must be positive")
    return weights


def load_tokenizer(reference: str) -> PreTrainedTokenizerBase:
    tokenizer = open_tokenizer(reference)
    if tokenizer.eos_token_id is None:
        raise DataError(f"the tokenizer {reference} has no end-of-text token to separate documents with")
    if len(tokenizer) > MAX_VOCAB:
        raise DataError(f"the tokenizer {reference} has {len(tokenizer)} ids; uint16 shards hold at most {MAX_VOCAB}")
    return tokenizer


def tokenizer_reference(reference: str) -> str:
    """A local tokenizer folder as an absolute path (training runs elsewhere); a Hub id as given."""
    path = Path(reference)
    return str(path.resolve()) if path.is_dir() else reference


@command
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument(
        "--source",
        dest="sources",
        action="append",
        required=True,
        metavar="[NAME=]WHERE",
        help="a file, a folder or hf:OWNER/NAME[:PATTERN]; repeat for more (same NAME: same source)",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        metavar="NAME=WEIGHT",
        help="mixture weights, one per source (relative); default: every document of every source",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the shards and meta.json")
    parser.add_argument("--tokenizer", default=PHI_TOKENIZER, help="Hub id or folder of the tokenizer")
    parser.add_argument("--text-field", default="text", help="the text's key in .jsonl records and .parquet columns")
    parser.add_argument("--held-out", type=float, default=0.01, help="fraction of each source's tokens held out")
    parser.add_argument(
        "--shard-tokens", type=int, default=100_000_000, help="tokens per training shard (2 bytes each)"
    )
    parser.add_argument("--max-tokens", type=int, default=0, help="cap on the corpus's tokens; 0 = no cap")
    parser.add_argument("--seed", type=int, default=0, help="seed for the document order and the held-out choice")
    parser.add_argument("--cache-dir", help="Hub cache folder for hf: sources")
    parser.add_argument("--overwrite", action="store_true", help="replace a corpus already in --out")
    return prepare(**vars(parser.parse_args(argv)))


def prepare(
    sources: Sequence[str],
    out: Path,
    weights: Sequence[str] | None = None,
    tokenizer: str = PHI_TOKENIZER,
    text_field: str = "text",
    held_out: float = 0.01,
    shard_tokens: int = 100_000_000,
    max_tokens: int = 0,
    seed: int = 0,
    cache_dir: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenise, mix and write a corpus into `out`: the command, typed; returns its meta.json."""
    if not 0 <= held_out < 1:
        raise DataError(f"--held-out must be in [0, 1), got {held_out}")
    if shard_tokens <= 0 or max_tokens < 0:
        raise DataError("--shard-tokens must be positive and --max-tokens ≥ 0")
    command = ["python", "-m", "training.prepare_text", *(arg for where in sources for arg in ("--source", where))]
    command += ["--weights", *weights] if weights else []
    options = {"--tokenizer": tokenizer, "--text-field": text_field, "--held-out": held_out, "--seed": seed}
    options |= {"--shard-tokens": shard_tokens, "--max-tokens": max_tokens}
    command += ["--out", str(out), *(str(item) for pair in options.items() for item in pair)]
    specs = parse_sources(sources)
    mixture = parse_weights(weights, list(specs))
    out = Path(out)
    if (out / META).exists() and not overwrite:
        raise DataError(f"{out} already holds a corpus ({META}); pass --overwrite to replace it")
    resolved = {name: [source_files(where, cache_dir) for where in wheres] for name, wheres in specs.items()}
    tokenizer_ids = load_tokenizer(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # the folder is not a corpus until the new meta.json is written
    for old in [*out.glob("train-*.bin"), out / HELD_OUT_FILE]:
        old.unlink(missing_ok=True)
    scratch = out / ".scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        tokenized = []
        for name, found in resolved.items():
            files = [path for paths, _ in found for path in paths]
            hub = next((repo for _, repo in found if repo), None)
            tokenized.append(tokenize_source(name, specs[name], files, hub, tokenizer_ids, text_field, scratch))
        quotas = plan_mixture({source.name: source.tokens for source in tokenized}, mixture, max_tokens)
        shards, held_out_shard, counts = write_corpus(tokenized, quotas, out, held_out, shard_tokens, seed)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    train_tokens = sum(shard["tokens"] for shard in shards)
    used = {name: count["train_tokens"] + count["held_out_tokens"] for name, count in counts.items()}
    meta = {
        "format": FORMAT,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "tokenizer": tokenizer_reference(tokenizer),
        "vocab_size": len(tokenizer_ids),
        "eos_token_id": tokenizer_ids.eos_token_id,
        "train": shards,
        "held_out": held_out_shard,
        "train_tokens": train_tokens,
        "held_out_tokens": held_out_shard["tokens"],
        "sources": {
            source.name: {
                "where": source.where,
                "hub_dataset": source.hub_dataset,
                "files": len(source.files),
                "documents": len(source.lengths),
                "tokens": source.tokens,
                "weight": None if mixture is None else mixture[source.name],
                "share": round(used[source.name] / max(1, sum(used.values())), 4),
                **counts[source.name],
                "skipped": dict(source.skipped),
            }
            for source in tokenized
        },
        "held_out_fraction": held_out,
        "seed": seed,
        "command": shlex.join(command),
    }
    atomic_write_text(out / META, json.dumps(meta, indent=1) + "\n")
    for source in tokenized:
        row = meta["sources"][source.name]
        print(
            f"{source.name}: {row['documents_used']}/{row['documents']} documents, "
            f"{row['train_tokens'] + row['held_out_tokens']:,} of {row['tokens']:,} tokens ({row['share']:.1%})"
        )
    print(f"{out}: {train_tokens:,} training tokens in {len(shards)} shard(s), {held_out_shard['tokens']:,} held out")
    return meta


if __name__ == "__main__":
    main()
