"""`moecluster routing-report` on the embedded trained model, over part of its held-out files."""

import math

import pytest

from cluster.cli import main
from cluster.demo_model import default_model_dir
from cluster.tools.routing_report import format_report, routing_report
from router.policies import POLICIES


@pytest.fixture(scope="module")
def report():
    return routing_report(default_model_dir(), max_tokens=2048, gen_tokens=0)


def test_every_policy_at_top_2_and_top_1_with_and_without_capacity(report):
    rows = {(r["policy"], r["top_k"], r["capacity_factor"]) for r in report["rows"]}
    assert rows == {(p, k, c) for p in POLICIES for k in (2, 1) for c in (None, 1.25)}
    assert all(math.isfinite(r["perplexity"]) and 0 <= r["agreement"] <= 1 for r in report["rows"])
    gate = report["rows"][0]
    assert (gate["policy"], gate["top_k"], gate["capacity_factor"], gate["agreement"]) == ("model", 2, None, 1.0)


def test_the_learned_gate_has_the_lowest_perplexity(report):
    plain = {r["policy"]: r["perplexity"] for r in report["rows"] if r["top_k"] == 2 and r["capacity_factor"] is None}
    assert min(plain, key=plain.get) == "model"
    assert all(r["expert_max_over_mean"] <= 1.25 + 1e-6 for r in report["rows"] if r["capacity_factor"])


def test_tokens_per_expert_by_kind_and_the_skew_a_rebalance_removes(report):
    layer = report["kinds"][0]
    assert {"keyword", "name", "whitespace", "punctuation"} <= set(layer["share"])
    assert all(abs(sum(share) - 1) < 1e-6 for share in layer["share"].values())
    before, after = report["rebalance"]["before"], report["rebalance"]["after"]
    assert after["replicas"] == 48 and before["replicas"] == 32
    assert max(after["expert_max_over_mean"].values()) < max(before["expert_max_over_mean"].values())
    assert "| model | 2 | - |" in format_report(report)


def test_the_cli_refuses_bad_sizes(capsys):
    assert main(["routing-report", "--max-tokens", "1"]) == 2
    assert main(["routing-report", "--gen-tokens", "-1"]) == 2
    assert "--max-tokens" in capsys.readouterr().err
