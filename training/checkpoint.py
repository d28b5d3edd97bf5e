"""Checkpoint folders that survive a kill at any instant, and what they hold beyond the weights.

A checkpoint is written into a staging folder; every file and the folder are fsynced, then a `complete`
marker (fsynced too) says it is whole. It replaces the previous one in two renames (checkpoint →
.checkpoint.old, staging → checkpoint) and the old one is deleted. At every instant one of the three
folders is a whole checkpoint, and `recover` (run before each save and at --resume) finds it and
removes the leftovers of an interrupted save or cleanup.

Everything is stored as tensors and plain values, so checkpoints load with `torch.load(weights_only=True)`:
resuming never unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from inference.cli import UsageError

CHECKPOINT = "checkpoint"  # the folder's name inside output_dir
STAGING, OLD = f".{CHECKPOINT}.tmp", f".{CHECKPOINT}.old"
COMPLETE = "complete"  # written last into a staging folder: the checkpoint is whole
# Test hook: "POINT" or "POINT@N" SIGKILLs the process the N-th time (default first) it reaches POINT.
CRASH_AT = "TRAINING_CRASH_AT"
_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Die here, as a pre-empted job does (SIGKILL: no cleanup, no exception), when `CRASH_AT` names this point."""
    target = os.environ.get(CRASH_AT)
    if not target:
        return
    point, _, count = target.partition("@")
    if point == name:
        _reached[name] += 1
        if _reached[name] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entries to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def seal(staging: Path) -> None:
    """Make a fully written staging folder durable, then mark it whole."""
    for path in staging.iterdir():
        fsync_path(path)
    (staging / COMPLETE).write_text("")
    fsync_path(staging / COMPLETE)
    fsync_path(staging)


def remove_tree(folder: Path) -> None:
    """Delete a folder file by file (a kill part-way leaves a partial folder that `recover` finishes)."""
    if not folder.exists():
        return
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
        crash_point("deleting-old")
    folder.rmdir()


def replace_checkpoint(output: Path) -> Path:
    """Put the sealed staging folder in place of output/checkpoint; returns the checkpoint's path."""
    staging, final, old = output / STAGING, output / CHECKPOINT, output / OLD
    if final.exists():
        final.rename(old)
        crash_point("between-renames")
    staging.rename(final)
    fsync_path(output)
    remove_tree(old)
    return final


def save_checkpoint(
    output: Path, accelerator: Accelerator, state: Callable[[], dict[str, Any]], save_config: Callable[[Path], Any]
) -> None:
    """Write output/checkpoint: every rank its RNG state, the main process `state()` and the config."""
    staging = output / STAGING
    if accelerator.is_main_process:
        recover(output)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), staging / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(state(), staging / "trainer.pt")
        crash_point("mid-write")
        save_config(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        seal(staging)
        replace_checkpoint(output)
    accelerator.wait_for_everyone()


def load_checkpoint(output: Path, accelerator: Accelerator) -> dict[str, Any]:
    """The newest whole checkpoint's state, with this rank's RNG state restored.

    On another number of processes than wrote it, rank r takes the RNG state of rank r mod the old
    count: the data goes on at the same sample with the same global batch (the order is dealt per
    global step), but dropout draws differ, so such a resume is equal in expectation, not bit-exact.
    """
    if accelerator.is_main_process:
        recover(output)
    accelerator.wait_for_everyone()
    folder = output / CHECKPOINT
    if not (folder / "trainer.pt").is_file():
        raise UsageError(f"--resume: no checkpoint in {folder}")
    state = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)
    rank = accelerator.process_index % state["world_size"]
    set_rng_state(torch.load(folder / f"rng_{rank}.pt", weights_only=True))
    return state


def recover(output: Path) -> Path | None:
    """Leave output/checkpoint the newest whole checkpoint and no leftovers; returns it, or None if there is none.

    `checkpoint` only ever appears by renaming a sealed folder, so when it exists it is whole. Without
    it, a kill fell between the two renames: the sealed staging folder is the newer whole one, the old
    folder the previous one.
    """
    staging, final, old = output / STAGING, output / CHECKPOINT, output / OLD
    if not final.exists():
        for candidate in (staging, old):
            if (candidate / COMPLETE).is_file() or (candidate == old and (candidate / "trainer.pt").is_file()):
                candidate.rename(final)
                fsync_path(output)
                break
    for leftover in (staging, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    return final if final.exists() else None


def trainable_checksum(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].float().numpy().tobytes())
    return digest.hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as tensors and plain values: loadable with `torch.load(weights_only=True)`."""
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position}
    numpy_state |= {"has_gauss": has_gauss, "cached_gaussian": cached_gaussian}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (
            numpy_state["algorithm"],
            keys,
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
