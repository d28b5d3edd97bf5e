"""The Hugging Face Hub as a source of weights: repo ids → local folders, and messages free of the token.

A weights reference is a local folder or `OWNER/NAME[@REVISION]`, downloaded once into the Hub cache
and served offline after that. The token is whatever `huggingface_hub` finds (`hf auth login` or
`HF_TOKEN`); it is never printed, and `scrub` removes it from error messages. Uploading lives in
`training.hub_upload`: only training pushes.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import get_token, snapshot_download, try_to_load_from_cache

from inference.config import ManifestError

HUB = "https://huggingface.co"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{6,}")


def parse_reference(reference: str) -> tuple[str, str | None] | None:
    """`owner/name` or `owner/name@revision` → (repo id, revision); None when it is not a repo id."""
    repo_id, _, revision = reference.partition("@")
    if not REPO_ID.match(repo_id) or repo_id.startswith((".", "/")):
        return None
    return repo_id, revision or None


def resolve_weights(reference: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local weights folder, or a Hub repo id (optionally `@revision`) downloaded once into the Hub cache.

    Once downloaded, the same id works offline (`HF_HUB_OFFLINE=1`, or no network: the cached snapshot).
    """
    path = Path(reference)
    if path.is_dir():
        return path
    parsed = parse_reference(str(reference))
    if parsed is None:
        raise ManifestError(f"weights folder {path} does not exist (and {str(reference)!r} is not a Hub repo id)")
    repo_id, revision = parsed
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir))
    except Exception as error:  # offline with nothing cached, no such repo, no access, network down
        raise ManifestError(
            f"weights folder {path} does not exist, and the Hub repo {repo_id!r} could not be fetched: "
            f"{error_reason(error)}"
        ) from None


def model_source(reference: str) -> str:
    """A base model reference as transformers loads it: `owner/name@revision` (a pinned commit) → the folder of
    that commit's snapshot, downloaded once into the Hub cache (where a Space's `preload_from_hub` puts it),
    then found offline; a folder or an unpinned id as it is."""
    parsed = parse_reference(reference)
    if parsed is None or parsed[1] is None or Path(reference).exists():
        return reference
    return str(resolve_weights(reference))


def pin_revision(reference: str) -> str:
    """`owner/name` → `owner/name@<commit>`: the commit of the snapshot this machine loaded it from (the Hub
    cache's), so weights made over it name the base model exactly; a folder, a pinned id or one not cached
    stays as it is."""
    parsed = parse_reference(reference)
    if parsed is None or parsed[1] is not None or Path(reference).exists():
        return reference
    config = try_to_load_from_cache(parsed[0], "config.json")
    return f"{parsed[0]}@{Path(config).parent.name}" if isinstance(config, str) else reference


def scrub(text: str) -> str:
    """Remove the Hub token (and anything shaped like one) from a message."""
    token = get_token()
    if token:
        text = text.replace(token, "hf_***")
    return TOKEN_PATTERN.sub("hf_***", text)


def error_reason(error: BaseException) -> str:
    """The first line of an error's message (its type when it has none), with any token scrubbed."""
    text = str(error)
    return scrub(text.splitlines()[0]) if text else type(error).__name__
