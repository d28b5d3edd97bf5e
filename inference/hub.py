"""The Hugging Face Hub: load weights from a repo id, write model cards, and publish folders.

Saving and publishing are separate steps: training writes a complete local folder first (weights,
manifest, config, metrics, loss plot, model card), and `push_folder` uploads that folder as it is, in
one commit. A failed upload never touches the local folder. The token is whatever `huggingface_hub`
finds (`hf auth login` or `HF_TOKEN`); it is never printed, and it is scrubbed from error messages.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCardData, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

from inference.config import Manifest, ManifestError, atomic_write_text

HUB = "https://huggingface.co"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{6,}")
PUSH_ATTEMPTS = 4
RUN_FILES = ("config.yaml", "log.csv", "loss.png", "run.json", "samples.jsonl")  # copied beside the weights


class PublishError(RuntimeError):
    """An upload that failed for good; the message says what happened and that the local folder is intact."""


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


def model_card(
    manifest: Manifest | None = None,
    *,
    title: str,
    summary: str,
    base_models: Sequence[str],
    library_name: str,
    pipeline_tag: str,
    datasets: Sequence[str] = (),
    license: str = "mit",
    tags: Sequence[str] = (),
    command: str | None = None,
    metrics: dict[str, Any] | None = None,
    has_plot: bool = False,
) -> str:
    """A model card (README.md) with Hub metadata in its YAML header."""
    data = ModelCardData(
        base_model=[model for model in base_models if not Path(model).is_absolute()] or None,
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        datasets=list(datasets) or None,
        license=license,
        tags=list(tags) or None,
    )
    lines = ["---", data.to_yaml(), "---", "", f"# {title}", "", summary, ""]
    if manifest is not None:
        lines += [
            "Served by this project's app: `python app.py --weights OWNER/THIS_REPO` (or a local copy).",
            "",
            f"- vision model: `{manifest.vision_model}` (hidden layer {manifest.vision_feature_layer}, "
            f"{manifest.image_tokens} patch tokens)",
            f"- projector: {manifest.projector.type.value}, {manifest.projector.in_features} → "
            f"{manifest.projector.out_features}",
            f"- language model: `{manifest.language_model}`"
            + (" + LoRA adapter (`adapter/`)" if manifest.adapter else ""),
            f"- prompt template: `{manifest.template.value}`",
            "",
        ]
    if command:
        lines += ["## How it was made", "", "```bash", command, "```", ""]
    if metrics:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in metrics.items() if value is not None]
        lines.append("")
    if has_plot:
        lines += ["![training and held-out loss](loss.png)", ""]
    return "\n".join(lines)


def complete_folder(folder: Path, run_dir: Path, card: str) -> None:
    """Add the run's config, metrics and loss plot, and the model card, to a saved weights/model folder."""
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, folder / name)
    atomic_write_text(folder / "README.md", card)


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


def _retryable(error: Exception) -> bool:
    """Server errors, rate limits and network failures; not refusals (401/403/404) or local problems."""
    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", None)
        return status is None or status == 429 or status >= 500
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    # The HTTP client's connection and timeout errors (httpx's family) are not OSErrors.
    return any(kind.__name__ in ("TransportError", "TimeoutException") for kind in type(error).__mro__)


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    commit_message: str | None = None,
    api: HfApi | None = None,
    attempts: int = PUSH_ATTEMPTS,
    wait: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = print,
) -> str:
    """Upload every file of `folder` to the model repo `repo_id` in one commit; returns the repo URL.

    The repo is created if needed. Network and server errors are retried with backoff (2, 4, 8 s);
    then, or at once for errors that a retry cannot fix (no access, bad name), `PublishError` says why.
    """
    folder = Path(folder)
    if not (folder / "README.md").is_file() and not any(folder.glob("*.json")):
        raise PublishError(f"{folder} is not a saved model folder (no README.md or manifest)")
    if parse_reference(repo_id) is None or "@" in repo_id:
        raise PublishError(f"{repo_id!r} is not a Hub repo id (expected OWNER/NAME)")
    api = api or HfApi()
    message = commit_message or f"Upload {folder.name}"
    for attempt in range(1, attempts + 1):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message, repo_type="model")
            url = f"{HUB}/{repo_id}"
            log(f"pushed {folder} to {url}")
            return url
        except Exception as error:
            reason = scrub(f"{type(error).__name__}: {error}")
            if not _retryable(error) or attempt == attempts:
                tries = f"after {attempt} attempt{'s' * (attempt > 1)}"
                raise PublishError(
                    f"could not push {folder} to {repo_id} ({tries}): {reason}. The local folder is intact; "
                    f"retry with: python -m training.push {folder} {repo_id}"
                ) from None
            delay = 2.0**attempt
            log(f"push to {repo_id} failed ({reason}); retrying in {delay:.0f} s")
            wait(delay)
    raise AssertionError("unreachable")
