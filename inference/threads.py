"""How many threads the CPU serving path uses: what the container may run, not what the host has.

torch sizes its thread pool from the cores it can see, which in a container on a shared host (a CPU
Basic Space) may be the host's dozens although the container's cgroup allows two. Threads beyond the
quota only get throttled, so serving takes the smaller of the CPUs this process may run on and the
cgroup's CPU quota (v2 `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`). An explicit
OMP_NUM_THREADS wins.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

CGROUP = Path("/sys/fs/cgroup")


def cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs the cgroup at `root` may use (quota / period); None when unlimited or not readable."""
    try:
        if (root / "cpu.max").is_file():  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        for folder in (root / "cpu", root / "cpu,cpuacct"):  # cgroup v1: quota -1 means unlimited
            if (folder / "cpu.cfs_quota_us").is_file():
                quota = int((folder / "cpu.cfs_quota_us").read_text())
                period = int((folder / "cpu.cfs_period_us").read_text())
                return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def choose_threads(root: Path = CGROUP) -> tuple[int, str]:
    """(threads, why): the CPUs this process may run on, capped by the cgroup's quota."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    visible = len(os.sched_getaffinity(0))
    quota = cpu_quota(root)
    if quota is None or quota >= visible:
        return visible, f"{visible} CPUs visible, no lower CPU quota"
    return max(1, math.floor(quota)), f"cgroup CPU quota {quota:g} of {visible} visible CPUs"


def set_threads(root: Path = CGROUP) -> int:
    """Size torch's thread pool by `choose_threads` and say what was chosen and why."""
    threads, why = choose_threads(root)
    torch.set_num_threads(threads)
    print(f"Using {threads} CPU threads ({why})", flush=True)
    return threads
