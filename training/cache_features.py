"""Run the frozen vision tower once over every image of some data files and cache the patch features.

    python -m training.cache_features --data data/coco/llava/coco_captions_train2017.json \
        data/coco/llava/coco_captions_val2017.json --image-folder data/coco --out data/coco/features

fp16 features of TinyCLIP at 49 × 640 take 63 KB per image (7.7 GB for COCO train2017 + val2017).
Both training stages read them instead of running the tower; an interrupted run resumes shard by
shard, and a rerun recomputes exactly the shards whose images (size, modification time) or vision
model (a fingerprint of its files) or layer changed. Unreadable images are recorded in meta.json and
left out of training, with a count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from inference.cli import ArgumentParser, command
from inference.config import TINYCLIP_ID
from inference.hub import model_source
from inference.vision import VisionTower, load_image, preprocess
from training.data import images_of
from training.feature_shards import (
    done_shards,
    image_stamp,
    model_fingerprint,
    remove_orphans,
    remove_shard,
    save_meta,
    save_shard,
)


class _Images(Dataset):
    """Decodes and preprocesses images in data-loader workers; an unreadable one yields its error."""

    def __init__(self, folder: Path, images: list[str], size: int) -> None:
        self.folder, self.images, self.size = folder, images, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            return preprocess([load_image(self.folder / self.images[index])], self.size)[0], None
        except Exception as error:  # PIL raises many types for broken files
            return None, f"{type(error).__name__}: {error}"


@torch.no_grad()
def build_cache(
    data_files: list[Path],
    image_folder: Path,
    out: Path,
    vision_model: str,
    feature_layer: int,
    batch_size: int = 64,
    shard_size: int = 4096,
    num_workers: int = 4,
) -> dict:
    """Write (or finish) a feature cache for all images the data files name; returns meta.json's content."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    images = images_of(data_files)  # the data files are read (and checked) before the tower is loaded
    vision_model = model_source(vision_model)  # a pinned Hub id: its commit's snapshot
    tower = VisionTower.from_pretrained(vision_model, feature_layer, dtype=dtype).to(device)
    key = {"fingerprint": model_fingerprint(vision_model), "feature_layer": feature_layer}
    out.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)
    shards = [images[start : start + shard_size] for start in range(0, len(images), shard_size)]
    done = done_shards(out)
    for stale in set(done) - set(range(len(shards))):  # left by an earlier run over more images
        remove_shard(out, stale)
    failed: dict[str, str] = {}
    cached = 0
    progress = tqdm(total=len(images), desc="caching features", unit="image")
    for index, shard in enumerate(shards):
        if still_valid(done.get(index), key, shard, image_folder):
            failed.update(done[index]["failed"])
            cached += len(done[index]["images"])
            progress.update(len(shard))
            continue
        names, rows, shard_failed = {}, [], {}
        stamps = {name: image_stamp(image_folder / name) for name in shard if (image_folder / name).is_file()}
        dataset = _Images(image_folder, shard, tower.image_size)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
        position = 0
        for batch in loader:
            pixels = []
            for (image_pixels, error), name in zip(batch, shard[position : position + len(batch)], strict=True):
                if error is None:
                    pixels.append(image_pixels)
                    names[name] = stamps[name]
                else:
                    shard_failed[name] = error
            position += len(batch)
            if pixels:
                rows.append(tower(torch.stack(pixels).to(device)).float().cpu().numpy().astype(np.float16))
            progress.update(len(batch))
        empty = np.zeros((0, tower.num_patches, tower.width), dtype=np.float16)
        key_and_failed = key | {"failed_stamps": {name: stamps.get(name) for name in shard_failed}}
        save_shard(out, index, names, np.concatenate(rows) if rows else empty, shard_failed, key_and_failed)
        failed.update(shard_failed)
        cached += len(names)
    progress.close()
    return save_meta(out, vision_model, key, (tower.num_patches, tower.width), cached, failed)


def still_valid(listing: dict | None, key: dict, shard: list[str], image_folder: Path) -> bool:
    """Whether a written shard holds this model's features of exactly these images, as they are now."""
    if not listing or any(listing.get(name) != value for name, value in key.items()):
        return False
    if set(listing["images"]) | set(listing["failed"]) != set(shard):
        return False

    def current(image: str) -> list[int] | None:
        return image_stamp(image_folder / image) if (image_folder / image).is_file() else None

    # An image that could not be read counts as changed once it is replaced (or appears): it is tried again.
    cached = all(current(image) == stamp for image, stamp in listing["images"].items())
    return cached and all(current(image) == stamp for image, stamp in listing.get("failed_stamps", {}).items())


@command
def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="LLaVA-style JSON files")
    parser.add_argument("--image-folder", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vision-model", default=TINYCLIP_ID)
    parser.add_argument("--feature-layer", type=int, default=-2, help="must match the training run's")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    parser.add_argument("--num-workers", type=int, default=4)
    args = parser.parse_args(argv)
    meta = build_cache(
        args.data,
        args.image_folder,
        args.out,
        args.vision_model,
        args.feature_layer,
        args.batch_size,
        args.shard_size,
        args.num_workers,
    )
    print(f"{args.out}: features of {meta['cached']} images; {len(meta['failed'])} unreadable images left out")
    return meta


if __name__ == "__main__":
    main()
