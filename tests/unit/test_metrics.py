"""One scrape sees every serving replica: their metrics merged, each sample labelled with its replica."""

from prometheus_client.parser import text_string_to_metric_families

from cluster.serving.metrics import ServingMetrics, merge_replicas


def _replica(tokens: int, ttft_s: float) -> bytes:
    metrics = ServingMetrics("m", 16, running=lambda: 1, waiting=lambda: 0)
    metrics.generation_tokens.inc(tokens)
    metrics.ttft.observe(ttft_s)
    metrics.add_expert_tokens({"0:1": tokens}, {0: 2})
    return metrics.render()


def test_every_replicas_samples_are_kept_under_their_own_label():
    merged = merge_replicas({"a": _replica(5, 0.01), "b": _replica(7, 2.0)})
    families = {f.name: f for f in text_string_to_metric_families(merged.decode())}
    tokens = {s.labels["replica"]: s.value for s in families["moecluster_generation_tokens"].samples
              if s.name.endswith("_total")}
    assert tokens == {"a": 5, "b": 7}
    counts = {s.labels["replica"]: s.value for s in families["moecluster_time_to_first_token_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {"a": 1, "b": 1}
    experts = [s for s in families["moecluster_expert_tokens"].samples if s.name.endswith("_total")]
    assert {(s.labels["replica"], s.labels["layer"], s.labels["expert"], s.value) for s in experts} == {
        ("a", "0", "1", 5), ("b", "0", "1", 7)}
    assert merged.count(b"# TYPE moecluster_generation_tokens_total counter\n") == 1  # one family per name


def test_the_kv_cache_figures_are_read_when_scraped():
    from prometheus_client.parser import text_string_to_metric_families

    stats = {"usage": 0.25, "preemptions": 3, "prefix_queries": 100, "prefix_hits": 48}
    metrics = ServingMetrics("m", 64, running=lambda: 0, waiting=lambda: 0, cache=lambda: stats)
    stats["preemptions"] = 4
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples["moecluster_kv_cache_usage_perc"] == 0.25 and samples["moecluster_num_preemptions_total"] == 4
    assert samples["moecluster_prefix_cache_queries_total"] == 100
    assert samples["moecluster_prefix_cache_hits_total"] == 48
