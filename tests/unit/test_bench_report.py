from cluster.tools.bench import hop_floor, ratios
from cluster.tools.floor import echo_floor_us


def _tps(value: float) -> dict:
    return {"output_tokens_per_s": value}


def _report(continuous: dict) -> dict:
    return {"workers": [1, 4], "moecluster": {"1": _tps(100.0), "4": _tps(300.0)},
            "inprocess": _tps(400.0), "transformers": _tps(200.0), "transformers_continuous": continuous,
            "equal": {"inprocess": _tps(90.0), "transformers": _tps(60.0)},
            "scoring": {"batched_speedup": 4.5, "batched_tok_s": 6000.0}, "transformers_scoring": {"tok_s": 8000.0},
            "schedule": {"whole": {"max_over_p50": 9.0}, "chunked": {"max_over_p50": 3.0},
                         "chunked_throughput_ratio": 0.9, "prefix": {"speedup": 6.0}}}


def test_ratios_put_the_largest_worker_count_over_each_peer():
    r = ratios(_report(_tps(150.0)))
    assert r["vs_transformers"] == 1.5 and r["vs_inprocess"] == 0.75 and r["vs_transformers_continuous"] == 2.0
    assert r["vs_inprocess_by_workers"] == {"1": 0.25, "4": 0.75}
    assert r["inprocess_vs_transformers"] == 1.5 and r["inprocess_vs_transformers_realistic"] == 2.0
    assert r["scoring_batched_vs_one_by_one"] == 4.5 and r["scoring_vs_transformers_forward"] == 0.75
    assert r["stream_gap_max_over_p50"] == {"whole": 9.0, "chunked": 3.0} and r["cached_prefix_ttft_speedup"] == 6.0


def test_a_skipped_continuous_peer_has_no_ratio():
    assert "vs_transformers_continuous" not in ratios(_report({"skipped": True, "error": "no CPU support"}))


def test_the_socket_echo_floor_is_a_positive_round_trip_between_processes():
    assert 0 < echo_floor_us(4096, iters=5)


def test_the_hop_over_its_floor_is_in_microseconds():
    micro = hop_floor({"back_to_back": (50.0, 20.0), "after_pause": (60.0, 20.0)}, 1024, iters=3)  # ms round trips
    floor = micro["hop_floor_us"]
    assert floor["payload_bytes"] == 1024
    assert micro["hop_over_floor_us"]["back_to_back"] == 50_000 - floor["back_to_back"]
    assert micro["overhead_over_floor_us"]["after_pause"] == 40_000 - floor["after_pause"]
