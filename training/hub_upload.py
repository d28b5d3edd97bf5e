"""Publishing a saved folder to the Hugging Face Hub, in one commit, retried; and completing it first.

Saving and publishing are separate steps: training writes a complete local folder first (weights,
manifest, config, metrics, loss plot, model card: `complete_folder`), and `push_folder` uploads that
folder as it is. A failed upload never touches the local folder. The token is whatever
`huggingface_hub` finds (`hf auth login` or `HF_TOKEN`); it is never printed (`inference.hub.scrub`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from inference.config import atomic_write_text
from inference.hub import HUB, parse_reference, scrub

PUSH_ATTEMPTS = 4
RUN_FILES = ("config.yaml", "log.csv", "loss.png", "run.json", "samples.jsonl")  # copied beside the weights


class PublishError(RuntimeError):
    """An upload that failed for good; the message says what happened and that the local folder is intact."""


def complete_folder(folder: Path, run_dir: Path, card: str) -> None:
    """Add the run's config, metrics and loss plot, and the model card, to a saved weights/model folder."""
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, folder / name)
    atomic_write_text(folder / "README.md", card)


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
