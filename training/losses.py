"""Loss bookkeeping: one held-out loss for the loop and `training.evaluate`; steps skipped for a bad loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from inference.cli import UsageError
from inference.prompt import IGNORE_INDEX

# A step whose loss is not finite (a micro-batch without a supervised token gives 0/0) is skipped; this
# many in a row stop the run.
MAX_BAD_STEPS = 5


class TrainingStopped(UsageError):
    """The run cannot go on as configured; the message says why and what to change."""


def supervised_tokens(labels: Any) -> int:
    """Targets a causal LM's loss averages over: labels after the one-position shift that are not ignored."""
    if isinstance(labels, torch.Tensor):
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
    return sum(label != IGNORE_INDEX for row in labels for label in row[1:])


def summed_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """(loss summed over the batch's supervised tokens, their number): held-out loss is Σ sums / Σ tokens.

    The one definition of held-out loss, shared by training and `training.evaluate`: every supervised
    token weighs the same, whatever batch it falls in.
    """
    tokens = supervised_tokens(batch["labels"])
    if tokens == 0:
        return torch.zeros((), dtype=torch.float64), 0
    return model(**batch).loss.double() * tokens, tokens


def mean_finite(values: list[float]) -> float:
    """The mean of the finite values (skipped steps are NaN); NaN when there is none."""
    finite = [value for value in values if math.isfinite(value)]
    return sum(finite) / len(finite) if finite else math.nan


class BadSteps:
    """Optimizer steps skipped for a non-finite loss: counted, and `MAX_BAD_STEPS` in a row stop the run."""

    def __init__(self) -> None:
        self.total = 0
        self.in_a_row = 0

    def good(self) -> None:
        self.in_a_row = 0

    def bad(self, step: int, log: Callable[[str], Any] | None = None) -> None:
        self.total += 1
        self.in_a_row += 1
        if log:
            log(f"step {step}: loss not finite, step skipped ({self.total} so far)")
        if self.in_a_row >= MAX_BAD_STEPS:
            raise TrainingStopped(
                f"{self.in_a_row} steps in a row up to step {step} had a non-finite loss (NaN or inf, or "
                "micro-batches without a supervised token): lower --lr, or use bf16 instead of fp16, then "
                "--resume from the last checkpoint"
            )

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.in_a_row = state.get("total", 0), state.get("in_a_row", 0)
