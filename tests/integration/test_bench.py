"""The benchmark harness in its smoke mode: it runs end to end and emits valid JSON. Not a timed test."""

import json
import os
import subprocess
import sys
import tempfile


def test_bench_smoke_emits_a_complete_report(tmp_path):
    out = tmp_path / "bench.json"
    ray_tmp = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "MOECLUSTER_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--smoke", "--json-out", str(out)], env=env, check=False,
                         timeout=900, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    ours = report["moecluster"]
    assert ours["output_tokens"] == report["workload"]["streams"] * report["workload"]["output_tokens"]
    assert ours["ttft_ms"]["p50"] > 0 and ours["tpot_ms"]["p99"] > 0
    assert set(ours["moe_layer_ms"]) == {"gating", "dispatch", "wait", "expert_compute", "combine"}
    assert ours["moe_layer_ms"]["expert_compute"] > 0
    assert set(report["inprocess"]["moe_layer_ms"]) == set(ours["moe_layer_ms"])
    assert report["inprocess"]["moe_layer_ms"]["expert_compute"] > 0
    assert {"moe_layer_32_tokens_ms", "moe_layer_2048_tokens_ms", "expert_gemm"} <= set(ours["micro"])
    assert {"distributed", "distributed_grpc_only", "in_process"} <= set(ours["micro"]["moe_layer_32_tokens_ms"])
    paused = ours["micro"]["moe_layer_after_pause_ms"]
    assert paused["tokens"] == 32 and paused["pause_ms"] > 0 and paused["distributed"] > 0 and paused["in_process"] > 0
    assert report["stream_interval"] == 2
    assert report["ratios"]["vs_transformers"] > 0 and report["ratios"]["vs_inprocess"] > 0
