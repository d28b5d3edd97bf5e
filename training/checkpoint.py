"""What a checkpoint holds beyond the weights: every RNG a run draws from, and a checksum of the trainable state.

Everything is stored as tensors and plain values, so checkpoints load with `torch.load(weights_only=True)`:
resuming never unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint"  # the folder's name inside output_dir


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
