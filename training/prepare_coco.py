"""COCO 2017 captions → LLaVA-style JSON for stage 1 (one record per caption, image paths checked).

Offline, from files you already have (annotations/ and train2017/, val2017/ under --coco-dir):
    python -m training.prepare_coco --coco-dir data/coco --out data/coco/llava
Online, fetching the official files first (resumable, MD5-checked, about 19 GB):
    python -m training.prepare_coco --coco-dir data/coco --out data/coco/llava --download

Writes coco_captions_{train,val}2017.json with image paths relative to --coco-dir. Images that are
missing or cannot be opened are counted, reported and left out; the run never stops on one.
"""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from inference.cli import ArgumentParser, UsageError, command
from inference.config import atomic_write_text
from inference.prompt import IMAGE_MARKER
from inference.vision import image_problem
from training.downloads import download

# The official COCO 2017 archives and their published MD5 sums.
COCO_FILES = {
    "annotations_trainval2017.zip": (
        "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
        "f4bbac642086de4f52a3fdda2de5fa2c",
    ),
    "val2017.zip": ("http://images.cocodataset.org/zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80"),
    "train2017.zip": ("http://images.cocodataset.org/zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2"),
}


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
