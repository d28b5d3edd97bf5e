"""Validate LLaVA-style instruction data (LLaVA-Instruct-150K or your own) and write a clean copy.

    python -m training.prepare_instruct --data data/llava/llava_instruct_150k.json \
        --image-folder data/coco --image-prefix train2017 --out data/llava/instruct_train.json

Records are checked with the same parser training uses (human/gpt pairs, one <image> marker in the
first question of a record that has an image) and their image must exist under --image-folder
(--verify-images also opens each one). Malformed records are counted by reason and left out.
--image-prefix rewrites LLaVA-Instruct's bare COCO file names ("000000033471.jpg") to paths relative
to the COCO root ("train2017/000000033471.jpg"), the keys of the stage-1 feature cache, so both
stages share one cache.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from inference.cli import ArgumentParser, command
from inference.config import atomic_write_text
from inference.prompt import Conversation
from inference.vision import image_problem
from training.data import read_json_list


def clean_records(
    records: list, image_folder: Path, image_prefix: str = "", verify_images: bool = False
) -> tuple[list[dict], Counter]:
    kept, skipped = [], Counter()
    checked: dict[str, str | None] = {}
    for record in tqdm(records, desc="validating", unit="record"):
        try:
            if not isinstance(record, dict):
                raise ValueError("record is not an object")
            Conversation.from_llava(record)
        except ValueError as error:
            skipped[str(error)] += 1
            continue
        record = dict(record)
        if record.get("image"):
            record["image"] = f"{image_prefix.rstrip('/')}/{record['image']}" if image_prefix else record["image"]
            if record["image"] not in checked:
                path = image_folder / record["image"]
                checked[record["image"]] = (
                    image_problem(path) if verify_images else (None if path.is_file() else "missing")
                )
            if problem := checked[record["image"]]:
                skipped[f"image {problem}"] += 1
                continue
        kept.append(record)
    return kept, skipped


def prepare(
    data: Path, image_folder: Path, out: Path, image_prefix: str = "", verify_images: bool = False
) -> dict[str, Any]:
    """The command, typed: validate `data`, write the clean copy to `out`; returns the counts."""
    records = read_json_list(data)
    kept, skipped = clean_records(records, image_folder, image_prefix, verify_images)
    atomic_write_text(out, json.dumps(kept))
    print(f"{data.name}: kept {len(kept)} of {len(records)} records → {out}")
    for reason, count in skipped.most_common():
        print(f"  skipped {count}: {reason}")
    return {"kept": len(kept), "skipped": dict(skipped)}


@command
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="LLaVA-style JSON list of conversations")
    parser.add_argument("--image-folder", type=Path, required=True)
    parser.add_argument("--image-prefix", default="", help="prepended to every image path (e.g. train2017)")
    parser.add_argument("--verify-images", action="store_true", help="open every image, not only check it exists")
    parser.add_argument("--out", type=Path, required=True)
    return prepare(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
