"""The benchmark harness in its smoke mode: it runs end to end and emits valid JSON. Not a timed test."""

import json
import os
import subprocess
import sys
import tempfile

PHASES = {"gating", "dispatch", "wait", "expert_compute", "overlapped", "combine"}


def test_bench_smoke_emits_a_complete_report(tmp_path):
    out = tmp_path / "bench.json"
    ray_tmp = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "MOECLUSTER_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--smoke", "--json-out", str(out)], env=env, check=False,
                         timeout=900, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["workload"]["kind"] == "realistic" and report["stream_interval"] == 2
    _check_served(report)
    _check_micro(report["micro"])
    _check_peers(report)
    _check_ratios(report)
    _check_scoring_and_schedule(report)
    _check_timeline(report["timeline"])


def _check_timeline(timeline):
    assert timeline["workers"] == 2 and {"1", "2"} <= set(timeline)
    for lanes in ("1", "2"):
        step = timeline[lanes]
        assert len(step["chart"]) == int(lanes) and step["step_ms"] > 0
        for phases in step["per_micro_batch_ms"].values():
            assert phases["wait"] >= 0 and phases["dispatch"] > 0 and phases["dense"] > 0
    assert any(phases["paused"] > 0 for phases in timeline["2"]["per_micro_batch_ms"].values())


def _check_scoring_and_schedule(report):
    scoring = report["scoring"]
    assert scoring["prompts"] == 4 and scoring["scored_tokens"] == 4 * 15
    assert scoring["batched_tok_s"] > 0 and scoring["one_by_one_tok_s"] > 0
    assert report["transformers_scoring"]["scored_tokens"] == 4 * 15
    schedule = report["schedule"]
    for name in ("whole", "chunked"):
        assert 0 < schedule[name]["gap_p50_ms"] <= schedule[name]["gap_max_ms"]
    assert schedule["prefix"]["first_ttft_ms"] > 0 and schedule["prefix"]["cached_ttft_ms"] > 0
    assert {"scoring_batched_vs_one_by_one", "stream_gap_max_over_p50", "cached_prefix_ttft_speedup"} <= set(
        report["ratios"])


def _check_served(report):
    asked = report["workload"]["lengths"]["output_tokens"]["total"]
    assert set(report["moecluster"]) == {str(n) for n in report["workers"]}
    for ours in report["moecluster"].values():
        assert ours["output_tokens"] == asked
        assert ours["ttft_ms"]["p50"] > 0 and ours["tpot_ms"]["p99"] > 0
        assert set(ours["moe_layer_ms"]) == PHASES and ours["moe_layer_ms"]["expert_compute"] > 0


def _check_micro(micro):
    assert {"moe_layer_32_tokens_ms", "moe_layer_2048_tokens_ms", "expert_gemm"} <= set(micro)
    assert {"distributed", "distributed_grpc_only", "in_process"} <= set(micro["moe_layer_32_tokens_ms"])
    paused = micro["moe_layer_after_pause_ms"]
    assert paused["tokens"] == 32 and paused["pause_ms"] > 0 and paused["distributed"] > 0 and paused["in_process"] > 0
    floor = micro["hop_floor_us"]
    assert floor["payload_bytes"] == 32 * 2 * 256 * 4  # tokens x top-k rows of the default model's hidden 256, fp32
    assert floor["back_to_back"] > 0 and floor["after_pause"] > 0
    assert set(micro["hop_over_floor_us"]) == set(micro["overhead_over_floor_us"]) == {"back_to_back", "after_pause"}


def _check_peers(report):
    asked = report["workload"]["lengths"]["output_tokens"]["total"]
    assert report["inprocess"]["output_tokens"] == report["transformers"]["output_tokens"] == asked
    assert set(report["inprocess"]["moe_layer_ms"]) == PHASES and report["inprocess"]["moe_layer_ms"]["expert_compute"] > 0
    assert report["transformers"]["batch_size"] == report["max_batch_size"]
    continuous = report["transformers_continuous"]
    assert continuous.get("output_tokens") == asked or (continuous["skipped"] and continuous["error"])
    equal = report["equal"]
    assert equal["workload"]["kind"] == "equal"
    assert equal["inprocess"]["output_tokens"] == equal["workload"]["streams"] * equal["workload"]["output_tokens"]


def _check_ratios(report):
    ratios = report["ratios"]
    assert ratios["vs_transformers"] > 0 and ratios["vs_inprocess"] > 0 and ratios["inprocess_vs_transformers"] > 0
    assert set(ratios["vs_inprocess_by_workers"]) == set(report["moecluster"])
    assert report["engine_lanes"] == 1 and set(report["overlap"]) == {"2"}  # the smoke run's ping-pong
    overlap = ratios["overlap_vs_inprocess_by_workers"]["2"]
    assert set(overlap) == set(report["moecluster"]) and all(r > 0 for r in overlap.values())
    assert set(report["overlap"]["2"]["2"]["moe_layer_ms"]) == PHASES
    assert ("vs_transformers_continuous" in ratios) != bool(report["transformers_continuous"].get("skipped"))
