"""A thread that Python starts computes with the process's torch thread budget, not OMP_NUM_THREADS (Ray sets 1)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import ctypes, json, threading, torch
from experts.threads import use_process_threads
torch.set_num_threads(2)
gomp = next((line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line), None)
omp = ctypes.CDLL(gomp) if gomp else None
seen = {}
def run():
    seen["before"] = omp.omp_get_max_threads()
    use_process_threads()
    seen["after"] = omp.omp_get_max_threads()
if omp:
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
print(json.dumps(seen))
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the loaded OpenMP runtime from /proc")
def test_a_python_thread_takes_the_process_budget():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    if not seen:
        pytest.skip("torch does not use libgomp here")
    assert seen == {"before": 1, "after": 2}


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, cap", [
    ({"cpu.max": "100000 100000\n"}, 1),  # cgroup v2: a Kubernetes limit of 1 CPU
    ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 CPUs: a second thread would be throttled
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_usable_cores_are_capped_by_the_cgroup_cpu_quota(tmp_path, files, cap):
    from experts.threads import usable_cores

    assert usable_cores(_cgroup(tmp_path, files)) == (_affinity() if cap is None else min(cap, _affinity()))


def test_a_quota_above_the_affinity_leaves_the_affinity(tmp_path):
    from experts.threads import usable_cores

    assert usable_cores(_cgroup(tmp_path, {"cpu.max": f"{(_affinity() + 4) * 100000} 100000\n"})) == _affinity()
