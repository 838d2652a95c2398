"""Torch's thread budget: how many cores a process may use, and in threads that Python starts.

OpenMP keeps its thread count per OS thread, and a thread that Python starts takes OMP_NUM_THREADS (Ray sets 1 in
every actor), whatever `torch.set_num_threads` said in the main thread: a worker's server threads and the serving
replica's engine thread computed on one core. Each such thread calls `use_process_threads` when it starts.
"""

import math
import os
from pathlib import Path

import torch

CGROUP = Path("/sys/fs/cgroup")


def use_process_threads() -> None:
    """Give this thread's torch ops the process's budget (`torch.set_num_threads`)."""
    torch.set_num_threads(torch.get_num_threads())


def usable_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may compute on: its CPU affinity, capped by its cgroup's CPU quota. A Kubernetes
    CPU limit is such a quota, and the affinity still shows every core of the node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cpu_quota(cgroup)
    return cores if quota is None else max(1, min(cores, math.floor(quota)))


def _cpu_quota(cgroup: Path) -> float | None:
    """CPUs per period allowed by cgroup v2's cpu.max or v1's cfs quota; None when unlimited or unknown."""
    try:
        if (cgroup / "cpu.max").exists():
            quota, period = (cgroup / "cpu.max").read_text().split()
        else:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1"):
        return None
    return int(quota) / int(period)
