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
