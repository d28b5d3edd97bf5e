"""Frozen vision features computed once per image, stored as fp16 shards that are memory-mapped.

Layout of a cache folder:
    meta.json               vision model, feature layer, feature shape, images that could not be read
    features-00000.npy      (n, patches, width) float16, one row per image
    features-00000.json     that shard's n image paths in row order, and its unreadable images (written last)

A shard counts as done once its .json exists, so an interrupted cache run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from inference.cli import UsageError
from inference.config import atomic_write_text

META = "meta.json"


class FeatureCacheError(UsageError):
    """A feature cache that is missing, unfinished, or made for another vision model or layer."""


def shard_name(index: int) -> str:
    return f"features-{index:05d}"


def save_shard(folder: Path, index: int, images: Sequence[str], features: np.ndarray, failed: dict[str, str]) -> None:
    """Write one shard: the array first (atomically), then its image lists, which mark it done."""
    if len(images) != len(features):
        raise ValueError(f"{len(images)} image names for {len(features)} feature rows")
    temp = folder / f".{shard_name(index)}.npy.tmp"
    with open(temp, "wb") as file:
        np.save(file, features.astype(np.float16))
    os.replace(temp, folder / f"{shard_name(index)}.npy")
    listing = {"images": list(images), "failed": failed}
    atomic_write_text(folder / f"{shard_name(index)}.json", json.dumps(listing))


def remove_shard(folder: Path, index: int) -> None:
    for suffix in (".json", ".npy"):  # the listing first: without it the shard no longer counts as done
        (folder / f"{shard_name(index)}{suffix}").unlink(missing_ok=True)


def done_shards(folder: Path) -> dict[int, dict]:
    """Shards already written, by index: {'images': [...], 'failed': {image: reason}}."""
    return {int(path.stem.split("-")[1]): json.loads(path.read_text()) for path in folder.glob("features-*.json")}


def save_meta(
    folder: Path, vision_model: str, feature_layer: int, shape: Sequence[int], cached: int, failed: dict[str, str]
) -> dict:
    meta = {
        "vision_model": vision_model,
        "feature_layer": feature_layer,
        "shape": list(shape),
        "cached": cached,
        "failed": failed,
    }
    atomic_write_text(folder / META, json.dumps(meta, indent=1))
    return meta


class FeatureCache:
    """Read access: `cache[image_path]` → (patches, width) float16 array, memory-mapped from its shard."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not (self.folder / META).is_file():
            raise FeatureCacheError(f"{self.folder} is not a finished feature cache (no {META}); run cache_features")
        self.meta = json.loads((self.folder / META).read_text())
        self.failed: dict[str, str] = self.meta["failed"]
        self._where: dict[str, tuple[int, int]] = {}
        for index, listing in done_shards(self.folder).items():
            for row, image in enumerate(listing["images"]):
                self._where[image] = (index, row)
        self._shards: dict[int, np.ndarray] = {}

    def check(self, vision_model: str, feature_layer: int) -> None:
        """Refuse a cache made with another vision model or layer than the run asks for."""
        made = (self.meta["vision_model"], self.meta["feature_layer"])
        if made != (vision_model, feature_layer):
            raise FeatureCacheError(
                f"{self.folder} holds features of {made[0]} layer {made[1]}, but this run uses "
                f"{vision_model} layer {feature_layer}"
            )

    def __contains__(self, image: str) -> bool:
        return image in self._where

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, image: str) -> np.ndarray:
        index, row = self._where[image]
        if index not in self._shards:  # opened lazily, in each data-loader worker separately
            self._shards[index] = np.load(self.folder / f"{shard_name(index)}.npy", mmap_mode="r")
        return self._shards[index][row]

    def stack(self, images: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self[image] for image in images]))


def open_cache(folder: str | Path, vision_model: str, feature_layer: int) -> FeatureCache | None:
    """The cache in `folder` after checking it matches the run's tower; None when no folder is given."""
    if not folder:
        return None
    cache = FeatureCache(folder)
    cache.check(vision_model, feature_layer)
    return cache
