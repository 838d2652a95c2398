"""The benchmark harness in its smoke mode: it runs end to end and emits valid JSON. Not a timed test."""

import json
import os
import subprocess
import sys


def test_bench_smoke_emits_a_complete_report(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray"), "MOECLUSTER_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "ray").mkdir()
    subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--smoke", "--json-out", str(out)], env=env,
                   check=True, timeout=900, capture_output=True)
    report = json.loads(out.read_text())
    ours = report["moecluster"]
    assert ours["output_tokens"] == report["workload"]["streams"] * report["workload"]["output_tokens"]
    assert ours["ttft_ms"]["p50"] > 0 and ours["tpot_ms"]["p99"] > 0
    assert set(ours["moe_layer_ms"]) == {"gating", "dispatch", "wait", "expert_compute", "combine"}
    assert ours["moe_layer_ms"]["expert_compute"] > 0
    assert {"moe_layer_32_tokens_ms", "moe_layer_2048_tokens_ms", "expert_gemm"} <= set(ours["micro"])
    assert report["ratios"]["vs_transformers"] > 0 and report["ratios"]["vs_inprocess"] > 0
