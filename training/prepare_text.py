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
shards (`train-00000.bin`, ..., --shard-tokens each), interleaved across sources. `meta.json`, written
last, describes the result; training refuses a folder without it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from inference.config import atomic_write_text
from inference.hub import error_reason
from training.config import command_line

PHI_TOKENIZER = "microsoft/phi-1_5"  # GPT-2's BPE (50,257 ids) plus phi's added tokens
TOKEN_DTYPE = np.uint16  # every id of a vocabulary up to 65,536 fits in two bytes
MAX_VOCAB = int(np.iinfo(TOKEN_DTYPE).max) + 1
META = "meta.json"
FORMAT = "packed-uint16/1"  # bumped if the layout changes
HELD_OUT_FILE = "val.bin"
TRAIN_PATTERN = "train-{:05d}.bin"
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
HUB_PREFIX = "hf:"
HUB_DEFAULT_PATTERNS = ["*.jsonl", "*.jsonl.gz", "*.parquet", "*.txt"]
TOKENIZE_BATCH = 512  # documents per tokenizer call: the fast tokenizer works through a call in parallel
WRITE_CHUNK = 1 << 22  # tokens gathered in memory before a write (8 MiB)
SOURCE_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


class DataError(ValueError):
    """Input that cannot become a token corpus; the message says which source or file and why."""


# --- reading documents --------------------------------------------------------------------------


def file_format(path: Path) -> str | None:
    """The supported suffix `path` ends with, or None."""
    name = path.name.lower()
    return next((suffix for suffix in SUFFIXES if name.endswith(suffix)), None)


def source_files(where: str, cache_dir: str | None = None) -> tuple[list[Path], str | None]:
    """The data files a source names, and the Hub dataset id when it came from the Hub."""
    if where.startswith(HUB_PREFIX):
        repo_id, _, pattern = where[len(HUB_PREFIX) :].partition(":")
        folder = download_hub_dataset(repo_id, pattern, cache_dir)
        files = sorted(path for path in folder.rglob("*") if path.is_file() and file_format(path))
        if not files:
            raise DataError(f"{where}: the Hub dataset {repo_id} has no {', '.join(SUFFIXES)} files matching it")
        return files, repo_id
    path = Path(where)
    if path.is_dir():
        files = sorted(item for item in path.rglob("*") if item.is_file() and file_format(item))
        if not files:
            raise DataError(f"{path} holds no {', '.join(SUFFIXES)} files")
        return files, None
    if path.is_file():
        if file_format(path) is None:
            raise DataError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
        return [path], None
    raise DataError(f"{where} does not exist (a file, a folder, or {HUB_PREFIX}OWNER/NAME[:PATTERN])")


def download_hub_dataset(repo_id: str, pattern: str, cache_dir: str | None) -> Path:
    """The files of a Hub dataset repo matching `pattern` (data files by default), downloaded once."""
    from huggingface_hub import snapshot_download

    patterns = [pattern] if pattern else HUB_DEFAULT_PATTERNS
    try:
        folder = snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns, cache_dir=cache_dir)
    except Exception as error:  # offline with nothing cached, no such repo, no access
        reason = error_reason(error)
        raise DataError(f"could not fetch the Hub dataset {repo_id!r} ({', '.join(patterns)}): {reason}") from None
    return Path(folder)


def read_documents(path: Path, text_field: str, skipped: Counter) -> Iterator[str]:
    """The documents of one file; records without text are counted in `skipped` by reason."""
    kind = file_format(path)
    if kind in (".txt", ".txt.gz"):
        opener = gzip.open if kind.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as file:
            yield file.read()
    elif kind in (".jsonl", ".jsonl.gz"):
        opener = gzip.open if kind.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as file:
            for line in file:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    skipped["line is not JSON"] += 1
                    continue
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    skipped[f"record has no string field {text_field!r}"] += 1
                    continue
                yield text
    elif kind == ".parquet":
        import pyarrow.parquet as parquet

        table = parquet.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise DataError(
                f"{path} has no column {text_field!r} (columns: {table.schema_arrow.names}); set --text-field"
            )
        for batch in table.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str):
                    yield text
                else:
                    skipped[f"{text_field!r} is null"] += 1
    else:
        raise DataError(f"{path}: unsupported file type")


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


def plan_mixture(available: dict[str, int], weights: dict[str, float] | None, max_tokens: int = 0) -> dict[str, int]:
    """Tokens to take from each source.

    With weights (relative; normalised here) the mixture holds them exactly as far as whole documents
    allow, and is as large as the scarcest source permits: no document is repeated. Without, every
    source is taken whole. `max_tokens` > 0 scales the plan down to that total.
    """
    if weights is None:
        quotas = dict(available)
    else:
        total_weight = sum(weights.values())
        shares = {name: weights[name] / total_weight for name in available}
        total = min(available[name] / shares[name] for name in available if shares[name] > 0)
        quotas = {name: round(total * shares[name]) for name in available}  # the scarcest: all of it
    planned = sum(quotas.values())
    if max_tokens and planned > max_tokens:
        quotas = {name: math.floor(quota * max_tokens / planned) for name, quota in quotas.items()}
    return quotas


def take_documents(lengths: np.ndarray, quota: int, rng: np.random.Generator) -> np.ndarray:
    """Document indices in a seeded random order, as many as fit in `quota` tokens (at least one if quota > 0)."""
    order = rng.permutation(len(lengths))
    cumulative = np.cumsum(lengths[order])
    count = int(np.searchsorted(cumulative, quota, side="right"))
    if quota > 0:
        count = max(count, 1)
    return order[:count]


def split_held_out(lengths: np.ndarray, chosen: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, training) documents: the first chosen ones up to `fraction` of the chosen tokens."""
    if fraction <= 0 or len(chosen) == 0:
        return chosen[:0], chosen
    target = fraction * lengths[chosen].sum()
    count = int(np.searchsorted(np.cumsum(lengths[chosen]), target, side="left")) + 1
    count = min(count, len(chosen) - 1)  # training keeps at least one document
    return chosen[:count], chosen[count:]


class PackedWriter:
    """Writes documents end to end into numbered shard files of at most `shard_tokens` tokens."""

    def __init__(self, folder: Path, pattern: str, shard_tokens: int) -> None:
        self.folder, self.pattern, self.shard_tokens = folder, pattern, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.file = None

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] + self.pending_tokens >= self.shard_tokens:
                self.next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"] - self.pending_tokens
            piece, tokens = tokens[:room], tokens[room:]
            self.pending.append(piece)
            self.pending_tokens += len(piece)
            if self.pending_tokens >= WRITE_CHUNK:
                self.flush()

    def flush(self) -> None:
        if self.pending:
            self.file.write(np.concatenate(self.pending).astype(TOKEN_DTYPE, copy=False).tobytes())
            self.shards[-1]["tokens"] += self.pending_tokens
            self.pending, self.pending_tokens = [], 0

    def next_shard(self) -> None:
        self.flush()
        if self.file is not None:
            self.file.close()
        name = self.pattern.format(len(self.shards))
        self.file = open(self.folder / name, "wb")  # noqa: SIM115 (closed in next_shard and close)
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> list[dict[str, Any]]:
        self.flush()
        if self.file is not None:
            self.file.close()
        return self.shards


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
        held_out_docs += [(number, index) for index in evaluation]
        train_docs += [(number, index) for index in training]
        counts[source.name] = {
            "documents_used": len(chosen),
            "train_tokens": int(source.lengths[training].sum()),
            "held_out_tokens": int(source.lengths[evaluation].sum()),
        }
    # Training documents interleaved across sources, so that every stretch of the stream has the mixture.
    train_docs = [train_docs[i] for i in rng.permutation(len(train_docs))]

    def write(documents: list[tuple[int, int]], writer: PackedWriter, label: str) -> list[dict[str, Any]]:
        for number, index in tqdm(documents, desc=f"writing {label}", unit="doc"):
            source = sources[number]
            start = starts[source.name][index]
            writer.add(maps[source.name][start : start + source.lengths[index]])
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
    tokenizer = AutoTokenizer.from_pretrained(reference)
    if tokenizer.eos_token_id is None:
        raise DataError(f"the tokenizer {reference} has no end-of-text token to separate documents with")
    if len(tokenizer) > MAX_VOCAB:
        raise DataError(f"the tokenizer {reference} has {len(tokenizer)} ids; uint16 shards hold at most {MAX_VOCAB}")
    return tokenizer


def tokenizer_reference(reference: str) -> str:
    """A local tokenizer folder as an absolute path (training runs elsewhere); a Hub id as given."""
    path = Path(reference)
    return str(path.resolve()) if path.is_dir() else reference


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source",
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
    args = parser.parse_args(argv)
    if not 0 <= args.held_out < 1:
        parser.error("--held-out must be in [0, 1)")
    if args.shard_tokens <= 0 or args.max_tokens < 0:
        parser.error("--shard-tokens must be positive and --max-tokens ≥ 0")
    try:
        return prepare(args, command_line("training.prepare_text", argv))
    except DataError as error:
        parser.error(str(error))


def prepare(args: argparse.Namespace, command: str) -> dict[str, Any]:
    specs = parse_sources(args.source)
    weights = parse_weights(args.weights, list(specs))
    out: Path = args.out
    if (out / META).exists() and not args.overwrite:
        raise DataError(f"{out} already holds a corpus ({META}); pass --overwrite to replace it")
    tokenizer = load_tokenizer(args.tokenizer)
    resolved = {name: [source_files(where, args.cache_dir) for where in wheres] for name, wheres in specs.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # the folder is not a corpus until the new meta.json is written
    for old in [*out.glob("train-*.bin"), out / HELD_OUT_FILE]:
        old.unlink(missing_ok=True)
    scratch = out / ".scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        sources = []
        for name, found in resolved.items():
            files = [path for paths, _ in found for path in paths]
            hub = next((repo for _, repo in found if repo), None)
            sources.append(tokenize_source(name, specs[name], files, hub, tokenizer, args.text_field, scratch))
        available = {source.name: source.tokens for source in sources}
        quotas = plan_mixture(available, weights, args.max_tokens)
        shards, held_out, counts = write_corpus(sources, quotas, out, args.held_out, args.shard_tokens, args.seed)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    train_tokens = sum(shard["tokens"] for shard in shards)
    used = {name: count["train_tokens"] + count["held_out_tokens"] for name, count in counts.items()}
    meta = {
        "format": FORMAT,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "tokenizer": tokenizer_reference(args.tokenizer),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "train": shards,
        "held_out": held_out,
        "train_tokens": train_tokens,
        "held_out_tokens": held_out["tokens"],
        "sources": {
            source.name: {
                "where": source.where,
                "hub_dataset": source.hub_dataset,
                "files": len(source.files),
                "documents": len(source.lengths),
                "tokens": source.tokens,
                "weight": None if weights is None else weights[source.name],
                "share": round(used[source.name] / max(1, sum(used.values())), 4),
                **counts[source.name],
                "skipped": dict(source.skipped),
            }
            for source in sources
        },
        "held_out_fraction": args.held_out,
        "seed": args.seed,
        "command": command,
    }
    atomic_write_text(out / META, json.dumps(meta, indent=1) + "\n")
    for source in sources:
        row = meta["sources"][source.name]
        print(
            f"{source.name}: {row['documents_used']}/{row['documents']} documents, "
            f"{row['train_tokens'] + row['held_out_tokens']:,} of {row['tokens']:,} tokens ({row['share']:.1%})"
        )
    print(f"{out}: {train_tokens:,} training tokens in {len(shards)} shard(s), {held_out['tokens']:,} held out")
    return meta


# --- reading the corpus at training time ----------------------------------------------------------


def load_meta(folder: str | Path) -> dict[str, Any]:
    """A prepared corpus's meta.json, checked against its files."""
    folder = Path(folder)
    path = folder / META
    if not path.is_file():
        raise DataError(f"{folder} is not a prepared corpus (no {META}); run python -m training.prepare_text")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}; prepare the corpus again")
    for shard in [*meta["train"], meta["held_out"]]:
        if shard["file"] is None:
            continue
        size = (folder / shard["file"]).stat().st_size if (folder / shard["file"]).is_file() else None
        if size != shard["tokens"] * np.dtype(TOKEN_DTYPE).itemsize:
            raise DataError(f"{folder / shard['file']} is missing or not the size {META} records")
    return meta


class TokenWindows(Sequence):
    """Consecutive, non-overlapping windows of `block_size` tokens over packed shards, memory-mapped.

    Each shard's tail shorter than a window is left out. The maps are opened on first use, in each
    process that reads (DataLoader workers included), never pickled.
    """

    def __init__(self, folder: str | Path, shards: list[dict[str, Any]], block_size: int) -> None:
        self.paths = [Path(folder) / shard["file"] for shard in shards if shard["file"] and shard["tokens"]]
        self.block_size = block_size
        windows = [shard["tokens"] // block_size for shard in shards if shard["file"] and shard["tokens"]]
        self.ends = np.cumsum(windows, dtype=np.int64)
        self.maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: int) -> np.ndarray:
        if not isinstance(index, int | np.integer):
            raise TypeError(f"windows are read one at a time, not by {type(index).__name__}")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        if self.maps is None:
            self.maps = [np.memmap(path, dtype=TOKEN_DTYPE, mode="r") for path in self.paths]
        shard = int(np.searchsorted(self.ends, index, side="right"))
        first = int(index - (self.ends[shard - 1] if shard else 0)) * self.block_size
        return np.asarray(self.maps[shard][first : first + self.block_size], dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "maps": None}


def load_corpus(folder: str | Path, block_size: int) -> tuple[TokenWindows, TokenWindows, dict[str, Any]]:
    """(training windows, held-out windows, meta) of a prepared corpus."""
    meta = load_meta(folder)
    held_out = meta["held_out"]
    return TokenWindows(folder, meta["train"], block_size), TokenWindows(folder, [held_out], block_size), meta


if __name__ == "__main__":
    main()
