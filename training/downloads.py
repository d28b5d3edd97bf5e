"""Resumable HTTP downloads: a `.part` file continued with a Range request, checked, then renamed."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

CHUNK = 1 << 20  # 1 MiB per read while downloading and hashing
HTTP_RANGE_NOT_SATISFIABLE = 416  # the server's answer to a range that starts at or after the file's end


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, path: Path, expected_md5: str | None = None, retries: int = 3) -> Path:
    """Fetch `url` to `path`, continuing a partial `.part` file with an HTTP Range request, then check MD5.

    Without a published checksum a file already at `path` is kept and a fetched one is not checked here
    (its reader checks the content).
    """
    if path.exists() and (expected_md5 is None or md5(path) == expected_md5):
        return path
    part = path.with_name(path.name + ".part")
    for attempt in range(1, retries + 1):
        try:
            fetch(url, part)
            break
        except OSError as error:
            if attempt == retries:
                raise OSError(f"downloading {url} failed after {retries} tries ({error}); rerun to continue") from error
            tqdm.write(f"{path.name}: {error}; retrying ({attempt}/{retries})")
    actual = md5(part) if expected_md5 is not None else None
    if actual != expected_md5:
        part.unlink()
        raise OSError(f"{path.name}: MD5 {actual} differs from the published {expected_md5}; the file was deleted")
    part.rename(path)
    return path


def fetch(url: str, part: Path) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        opened = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        if have and error.code == HTTP_RANGE_NOT_SATISFIABLE:
            return  # nothing after the bytes we have: the .part is whole (a run was killed while checking it)
        raise
    with opened as response:
        if have and response.status != 206:  # the server ignored the range: start again
            have = 0
        total = int(response.headers.get("Content-Length", 0)) + have
        with (
            open(part, "ab" if have else "wb") as file,
            tqdm(total=total or None, initial=have, unit="B", unit_scale=True, desc=part.stem) as bar,
        ):
            while chunk := response.read(CHUNK):
                file.write(chunk)
                bar.update(len(chunk))
