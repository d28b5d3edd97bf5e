"""A run's log: `log.csv` (one row per logging window or evaluation), its loss plot, and its throughput."""

from __future__ import annotations

import csv
import os
import statistics
from pathlib import Path
from typing import Any

LOG_FIELDS = ["step", "epoch", "train_loss", "eval_loss", "lr", "samples_per_s", "tokens_per_s", "gpu_mem_gb", "mfu"]


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Add one row to log.csv (writing the header first in a new file); None is written as empty."""
    new = not path.exists()
    with open(path, "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=LOG_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({key: ("" if value is None else value) for key, value in row.items()})


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint a run resumes from (the interrupted run's tail)."""
    if not path.exists():
        return
    with open(path, newline="") as file:
        rows = [row for row in csv.DictReader(file) if int(row["step"]) <= step]
    temp = path.with_suffix(".tmp")
    with open(temp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temp, path)


def plot_losses(log: Path, image: Path, title: str) -> None:
    """Training and held-out loss against step, from log.csv, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    with open(log, newline="") as file:
        rows = list(csv.DictReader(file))
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for column, label in (("train_loss", "training"), ("eval_loss", "held-out")):
        points = [(int(row["step"]), float(row[column])) for row in rows if row[column]]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o" if column == "eval_loss" else None, label=label)
    axes.set(xlabel="optimizer step", ylabel="loss", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    temp = image.with_name(f".{image.name}")
    figure.savefig(temp, format="png", dpi=100)
    plt.close(figure)
    os.replace(temp, image)


def throughput(log: Path, skip_first: bool = True) -> tuple[float | None, float | None]:
    """Median tokens/s and MFU over the log's training rows (the first window, with its warm-up, left out)."""
    with open(log, newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["tokens_per_s"]]
    if skip_first and len(rows) > 1:
        rows = rows[1:]
    speeds = [float(row["tokens_per_s"]) for row in rows]
    mfus = [float(row["mfu"]) for row in rows if row.get("mfu")]
    return (statistics.median(speeds) if speeds else None), (statistics.median(mfus) if mfus else None)
