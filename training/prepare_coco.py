"""COCO 2017 captions → LLaVA-style JSON for stage 1 (one record per caption, image paths checked).

Offline, from files you already have (annotations/ and train2017/, val2017/ under --coco-dir):
    python -m training.prepare_coco --coco-dir data/coco --out data/coco/llava
Online, fetching the official files first (resumable, MD5-checked, about 19 GB):
    python -m training.prepare_coco --coco-dir data/coco --out data/coco/llava --download

Writes coco_captions_{train,val}2017.json with image paths relative to --coco-dir. Images that are
missing or cannot be opened are counted, reported and left out; the run never stops on one.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from inference.cli import ArgumentParser, UsageError, command
from inference.config import atomic_write_text
from inference.prompt import IMAGE_MARKER
from inference.vision import image_problem

# The official COCO 2017 archives and their published MD5 sums.
COCO_FILES = {
    "annotations_trainval2017.zip": (
        "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
        "f4bbac642086de4f52a3fdda2de5fa2c",
    ),
    "val2017.zip": ("http://images.cocodataset.org/zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80"),
    "train2017.zip": ("http://images.cocodataset.org/zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2"),
}
CHUNK = 1 << 20  # 1 MiB per read while downloading and hashing
HTTP_RANGE_NOT_SATISFIABLE = 416  # the server's answer to a range that starts at or after the file's end


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, path: Path, expected_md5: str, retries: int = 3) -> Path:
    """Fetch `url` to `path`, continuing a partial `.part` file with an HTTP Range request, then check MD5."""
    if path.exists() and md5(path) == expected_md5:
        return path
    part = path.with_name(path.name + ".part")
    for attempt in range(1, retries + 1):
        try:
            _fetch(url, part)
            break
        except OSError as error:
            if attempt == retries:
                raise OSError(f"downloading {url} failed after {retries} tries ({error}); rerun to continue") from error
            tqdm.write(f"{path.name}: {error}; retrying ({attempt}/{retries})")
    actual = md5(part)
    if actual != expected_md5:
        part.unlink()
        raise OSError(f"{path.name}: MD5 {actual} differs from the published {expected_md5}; the file was deleted")
    part.rename(path)
    return path


def _fetch(url: str, part: Path) -> None:
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


def download_coco(coco_dir: Path) -> None:
    coco_dir.mkdir(parents=True, exist_ok=True)
    for name, (url, checksum) in COCO_FILES.items():
        archive = download(url, coco_dir / name, checksum)
        marker = coco_dir / f".{name}.extracted"
        if not marker.exists():
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(coco_dir)
            marker.touch()


def convert(captions_file: Path, coco_dir: Path, image_subdir: str) -> tuple[list[dict], Counter]:
    """COCO captions JSON → one LLaVA-style record per caption of a readable image."""
    data = json.loads(captions_file.read_text())
    files = {image["id"]: f"{image_subdir}/{image['file_name']}" for image in data["images"]}
    problems = {
        image_id: problem
        for image_id, relative in tqdm(files.items(), desc=f"checking {image_subdir}", unit="image")
        if (problem := image_problem(coco_dir / relative))
    }
    records, skipped = [], Counter()
    for annotation in data["annotations"]:
        image_id, caption = annotation["image_id"], " ".join(annotation["caption"].split())
        if image_id not in files or image_id in problems:
            skipped[problems.get(image_id, "unknown image id")] += 1
            continue
        if not caption:
            skipped["empty caption"] += 1
            continue
        records.append(
            {
                "id": f"{image_id}-{annotation['id']}",
                "image": files[image_id],
                "conversations": [{"from": "human", "value": IMAGE_MARKER}, {"from": "gpt", "value": caption}],
            }
        )
    skipped["images missing"] = sum(problem == "missing" for problem in problems.values())
    skipped["images corrupt"] = sum(problem == "corrupt" for problem in problems.values())
    return records, skipped


def prepare(
    coco_dir: Path, out: Path, download: bool = False, splits: tuple[str, ...] = ("train", "val")
) -> dict[str, dict]:
    """The command, typed: (download and) convert each split; returns per-split counts."""
    if download:
        download_coco(coco_dir)
    report = {}
    for split in splits:
        captions = coco_dir / "annotations" / f"captions_{split}2017.json"
        if not captions.is_file():
            raise UsageError(f"{captions} not found: pass --download, or unpack annotations_trainval2017.zip there")
        records, skipped = convert(captions, coco_dir, f"{split}2017")
        target = out / f"coco_captions_{split}2017.json"
        atomic_write_text(target, json.dumps(records))
        images = len({record["image"] for record in records})
        report[split] = {"captions": len(records), "images": images, **skipped}
        print(
            f"{split}: {len(records)} captions of {images} images → {target}; "
            f"skipped {skipped['images missing']} missing and {skipped['images corrupt']} corrupt images "
            f"({sum(skipped[k] for k in ('missing', 'corrupt'))} captions)"
        )
    return report


@command
def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--coco-dir", type=Path, required=True, help="holds annotations/, train2017/, val2017/")
    parser.add_argument("--out", type=Path, required=True, help="folder for the LLaVA-style JSON files")
    parser.add_argument("--download", action="store_true", help="fetch the official COCO 2017 files first")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    args = parser.parse_args(argv)
    return prepare(args.coco_dir, args.out, args.download, tuple(args.splits))


if __name__ == "__main__":
    main()
