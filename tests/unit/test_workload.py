import random
import statistics

import pytest

from cluster.tools import workload as flags
from cluster.tools.workload import Lengths, Request, Workload, describe, padded_steps, static_batches


def test_the_same_seed_draws_the_same_requests_and_another_seed_others():
    assert Workload(seed=3).requests(512) == Workload(seed=3).requests(512)
    assert Workload(seed=3).lengths() != Workload(seed=4).lengths()


def test_lengths_do_not_depend_on_the_vocabulary():
    assert [(len(r.prompt_ids), r.output_tokens) for r in Workload().requests(100)] == Workload().lengths()


def test_realistic_lengths_stay_in_bounds_and_most_are_short():
    workload = Workload(streams=64, requests_per_stream=16)
    prompts, outputs = zip(*workload.lengths())
    assert 16 <= min(prompts) and max(prompts) <= 512 and 8 <= min(outputs) and max(outputs) <= 256
    assert statistics.median(prompts) < 512 / 4 and statistics.median(outputs) < 256 / 4
    assert max(outputs) > 4 * statistics.median(outputs)  # a long tail, not a narrow spread


def test_a_lengths_draw_is_clipped_to_its_bounds():
    rng = random.Random(0)
    draws = [Lengths(5, 6, 7, sigma=3.0).draw(rng) for _ in range(200)]
    assert set(draws) <= {5, 6, 7} and {5, 7} <= set(draws)


def test_the_equal_workload_gives_every_request_the_same_lengths():
    requests = Workload("equal", streams=3, requests_per_stream=2, prompt_tokens=5, output_tokens=7).requests(50)
    assert len(requests) == 6 and all(len(r.prompt_ids) == 5 and r.output_tokens == 7 for r in requests)
    assert all(3 <= t < 50 for r in requests for t in r.prompt_ids)


def test_static_batches_keep_arrival_order_and_pay_for_their_longest_output():
    requests = [Request([1] * i, n) for i, n in enumerate([2, 9, 3, 4, 1], start=1)]
    batches = static_batches(requests, 2)
    assert [[len(r.prompt_ids) for r in b] for b in batches] == [[1, 2], [3, 4], [5]]
    assert padded_steps(batches) == 2 * 9 + 2 * 4 + 1 * 1


def test_describe_reports_the_spread_of_both_lengths():
    summary = describe([Request([1, 2], 3), Request([1, 2, 3, 4], 5), Request([1] * 9, 40)])
    assert summary["requests"] == 3
    assert summary["prompt_tokens"] == {"p50": 4, "p99": 9, "max": 9, "total": 15}
    assert summary["output_tokens"]["total"] == 48


def test_flags_parse_into_lengths_and_worker_counts():
    assert flags.parse_lengths("16:64:512") == Lengths(16, 64, 512)
    assert flags.parse_counts("1,2,4") == [1, 2, 4]
    for bad in ("64:16:512", "0:1:2", "1:2"):
        with pytest.raises(ValueError):
            flags.parse_lengths(bad)
    for bad in ("0,2", "2,2", "a"):
        with pytest.raises(ValueError):
            flags.parse_counts(bad)
