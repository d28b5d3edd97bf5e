"""Text corpora on disk: reading source documents, and the packed uint16 token shards pretraining reads.

Sources are `.txt` (the whole file is one document), `.jsonl` (one document per line, in a text
field) and `.parquet` (a text column), `.txt.gz` and `.jsonl.gz` too, from a file, a folder or a Hub
dataset repo (`hf:OWNER/NAME[:PATTERN]`). A prepared corpus is a folder of shards holding documents end
to end as uint16 ids (`train-00000.bin`, ..., and `val.bin` held out) described by `meta.json`, written
last: `training.prepare_text` writes one (mixing sources and splitting off held-out tokens with the
functions at the end), `training.pretrain` memory-maps it as `TokenWindows`.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from inference.hub import error_reason
from training.data import DataError

TOKEN_DTYPE = np.uint16  # every id of a vocabulary up to 65,536 fits in two bytes
MAX_VOCAB = int(np.iinfo(TOKEN_DTYPE).max) + 1
META = "meta.json"
FORMAT = "packed-uint16/1"  # bumped if the layout changes
HELD_OUT_FILE = "val.bin"
TRAIN_PATTERN = "train-{:05d}.bin"
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
HUB_PREFIX = "hf:"
HUB_DEFAULT_PATTERNS = ["*.jsonl", "*.jsonl.gz", "*.parquet", "*.txt"]
WRITE_CHUNK = 1 << 22  # tokens gathered in memory before a write (8 MiB)


def open_tokenizer(reference: str) -> PreTrainedTokenizerBase:
    """A corpus's tokenizer (Hub id or folder); one that cannot be found names the flag that chose it."""
    try:
        return AutoTokenizer.from_pretrained(reference)
    except OSError as error:  # no such folder or repo, or offline with nothing cached
        raise DataError(f"--tokenizer {reference} could not be loaded: {error_reason(error)}") from None


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


# --- the packed format ---------------------------------------------------------------------------


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


Piece = tuple[int, int, int]  # (document index, first token, end token)


def split_held_out(lengths: np.ndarray, chosen: np.ndarray, fraction: float) -> tuple[list[Piece], list[Piece]]:
    """(held-out, training) pieces: whole chosen documents, in order, that fit in `fraction` of the tokens.

    A document that would overshoot the share is passed over for later, shorter ones, so the held-out
    share is never exceeded and no document is on both sides. When no whole document fits (one long
    document, as a single .txt file is), the held-out tokens are cut from the head of the first one and
    its rest is trained on.
    """
    pieces = [(int(index), 0, int(lengths[index])) for index in chosen]
    if fraction <= 0 or not pieces:
        return [], pieces
    remaining = max(1, round(fraction * sum(end for _, _, end in pieces)))
    held_out, training = [], []
    for piece in pieces:
        if piece[2] <= remaining:
            held_out.append(piece)
            remaining -= piece[2]
        else:
            training.append(piece)
    if held_out:
        return held_out, training
    index, _, end = pieces[0]
    return [(index, 0, remaining)], [(index, remaining, end), *pieces[1:]]
