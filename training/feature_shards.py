"""Frozen vision features computed once per image, stored as fp16 shards that are memory-mapped.

Layout of a cache folder:
    meta.json                   vision model, its fingerprint, feature layer, feature shape, unreadable images
    features-00000-<id>.npy     (n, patches, width) float16, one row per image
    features-00000.json         the shard: its array's file name, its n images in row order with the size
                                and modification time each had, its unreadable images (written last)

A cache knows what it holds: the vision model by a fingerprint of its config and weight files (a Hub
id that now resolves to other weights does not match), the feature layer, and each image by size and
modification time. Training refuses a mismatch with a message saying how to rebuild. A shard's array
gets a fresh name and its listing, written atomically afterwards, names it: names and rows change
together or not at all. A shard counts as done once its listing exists, so an interrupted cache run
resumes where it stopped, and a rerun recomputes exactly the shards whose images or model changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers.utils.hub import cached_file

from inference.cli import UsageError
from inference.config import atomic_write_text

META = "meta.json"
# The files transformers loads weights from, in the order it prefers them.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class FeatureCacheError(UsageError):
    """A feature cache that is missing, unfinished, or made for another vision model, layer or images."""


def model_fingerprint(model_id: str) -> str:
    """A hash of a model's config and weight files, wherever `model_id` resolves (a folder or the Hub cache)."""
    folder = Path(cached_file(model_id, "config.json")).parent
    files = [folder / "config.json"]
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            files.append(folder / name)
            if name.endswith(".index.json"):
                shards = json.loads((folder / name).read_text())["weight_map"].values()
                files += [folder / shard for shard in sorted(set(shards))]
            break
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as file:
            while chunk := file.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def image_stamp(path: Path) -> list[int]:
    """What says an image file is the one whose features were cached: [size in bytes, modification time in ns]."""
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def shard_name(index: int) -> str:
    return f"features-{index:05d}"


def save_shard(
    folder: Path,
    index: int,
    images: dict[str, list[int]],
    features: np.ndarray,
    failed: dict[str, str],
    key: dict,
) -> None:
    """Write one shard: its array under a fresh name, then (atomically) the listing that names it.

    `images` maps each row's image to its stamp, in row order; `key` (fingerprint, layer, and the stamps
    of the images that could not be read) says what made the rows. The array an earlier listing named
    is deleted only once the new listing is in place.
    """
    if len(images) != len(features):
        raise ValueError(f"{len(images)} image names for {len(features)} feature rows")
    previous = read_listing(folder, index)
    array = f"{shard_name(index)}-{uuid.uuid4().hex[:8]}.npy"
    with open(folder / array, "wb") as file:
        np.save(file, features.astype(np.float16))
        file.flush()
        os.fsync(file.fileno())
    listing = {"array": array, **key, "images": images, "failed": failed}
    atomic_write_text(folder / f"{shard_name(index)}.json", json.dumps(listing))
    if previous and previous.get("array") != array:
        (folder / previous.get("array", f"{shard_name(index)}.npy")).unlink(missing_ok=True)


def read_listing(folder: Path, index: int) -> dict | None:
    path = folder / f"{shard_name(index)}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def remove_shard(folder: Path, index: int) -> None:
    listing = read_listing(folder, index)
    (folder / f"{shard_name(index)}.json").unlink(missing_ok=True)  # first: the shard no longer counts as done
    if listing:
        (folder / listing.get("array", f"{shard_name(index)}.npy")).unlink(missing_ok=True)


def done_shards(folder: Path) -> dict[int, dict]:
    """Shards already written, by index: their listings."""
    return {int(path.stem.split("-")[1]): json.loads(path.read_text()) for path in folder.glob("features-*.json")}


def remove_orphans(folder: Path) -> None:
    """Delete arrays no listing names (left by a run killed between an array and its listing)."""
    named = {listing.get("array") for listing in done_shards(folder).values()}
    for path in folder.glob("features-*.npy"):
        if path.name not in named:
            path.unlink()


def save_meta(
    folder: Path, vision_model: str, key: dict, shape: Sequence[int], cached: int, failed: dict[str, str]
) -> dict:
    meta = {"vision_model": vision_model, **key, "shape": list(shape), "cached": cached, "failed": failed}
    atomic_write_text(folder / META, json.dumps(meta, indent=1))
    return meta


def rebuild_hint(folder: Path) -> str:
    return f"rebuild it with python -m training.cache_features --out {folder} (it recomputes only what changed)"


class FeatureCache:
    """Read access: `cache[image_path]` → (patches, width) float16 array, memory-mapped from its shard."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not (self.folder / META).is_file():
            raise FeatureCacheError(f"{self.folder} is not a finished feature cache (no {META}); run cache_features")
        self.meta = json.loads((self.folder / META).read_text())
        if "fingerprint" not in self.meta:
            raise FeatureCacheError(
                f"{self.folder} was made by an older version of cache_features; {rebuild_hint(self.folder)}"
            )
        self.failed: dict[str, str] = self.meta["failed"]
        self._where: dict[str, tuple[str, int]] = {}
        self.stamps: dict[str, list[int]] = {}
        for listing in done_shards(self.folder).values():
            for row, (image, stamp) in enumerate(listing["images"].items()):
                self._where[image] = (listing["array"], row)
                self.stamps[image] = stamp
            self.stamps |= listing.get("failed_stamps", {})  # unreadable then: a replaced one is a change too
        self._shards: dict[str, np.ndarray] = {}

    def check(self, vision_model: str, feature_layer: int, image_folder: str | Path | None = None) -> None:
        """Refuse a cache made with another vision model (by fingerprint) or layer, or from changed images."""
        made = (self.meta["vision_model"], self.meta["feature_layer"])
        if made[1] != feature_layer or self.meta["fingerprint"] != model_fingerprint(vision_model):
            raise FeatureCacheError(
                f"{self.folder} holds features of {made[0]} layer {made[1]} (fingerprint {self.meta['fingerprint']}), "
                f"but this run uses {vision_model} layer {feature_layer}: {rebuild_hint(self.folder)} "
                f"--vision-model {vision_model} --feature-layer {feature_layer}"
            )
        if image_folder:
            changed = [
                image
                for image, stamp in self.stamps.items()
                if (path := Path(image_folder) / image).is_file() and (stamp is None or image_stamp(path) != stamp)
            ]
            if changed:
                raise FeatureCacheError(
                    f"{len(changed)} images in {image_folder} changed since {self.folder} was made (first: "
                    f"{changed[0]}): {rebuild_hint(self.folder)} --image-folder {image_folder}"
                )

    def __contains__(self, image: str) -> bool:
        return image in self._where

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, image: str) -> np.ndarray:
        array, row = self._where[image]
        if array not in self._shards:  # opened lazily, in each data-loader worker separately
            self._shards[array] = np.load(self.folder / array, mmap_mode="r")
        return self._shards[array][row]

    def stack(self, images: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self[image] for image in images]))


def open_cache(
    folder: str | Path, vision_model: str, feature_layer: int, image_folder: str | Path | None = None
) -> FeatureCache | None:
    """The cache in `folder` after checking it matches the run's tower and images; None when no folder is given."""
    if not folder:
        return None
    cache = FeatureCache(folder)
    cache.check(vision_model, feature_layer, image_folder)
    return cache
