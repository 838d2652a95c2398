"""A serving replica's Prometheus metrics, served at GET /metrics in the text format. The names follow vLLM's
under a `moecluster_` prefix; the expert metrics are what only a disaggregated MoE server can show."""

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from experts.keys import parse_expert_key

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class _CacheCollector:
    """The engine's KV-cache figures, read when scraped."""

    def __init__(self, model_name: str, stats):
        self.model_name, self.stats = model_name, stats

    def collect(self):
        stats = self.stats()
        usage = GaugeMetricFamily("moecluster_kv_cache_usage_perc", "Share of the KV-cache budget in use, 0 to 1.",
                                  labels=["model_name"])
        usage.add_metric([self.model_name], stats["usage"])
        yield usage
        for name, key, text in [
            ("moecluster_num_preemptions", "preemptions", "Sequences preempted for KV-cache room."),
            ("moecluster_prefix_cache_queries", "prefix_queries", "Prompt positions looked up in the prefix cache."),
            ("moecluster_prefix_cache_hits", "prefix_hits", "Prompt positions found in the prefix cache."),
        ]:
            counter = CounterMetricFamily(name, text, labels=["model_name"])
            counter.add_metric([self.model_name], stats[key])
            yield counter


class ServingMetrics:
    def __init__(self, model_name: str, expert_series_cap: int, running, waiting, cache=None):
        """`running()` and `waiting()` count the engine's sequences when scraped, `cache()` gives its KV-cache
        figures (Engine.cache_stats). Above `expert_series_cap` routed experts, tokens are exported per layer (with
        each layer's max/mean imbalance), not per expert."""
        self.registry = registry = CollectorRegistry()
        if cache is not None:
            registry.register(_CacheCollector(model_name, cache))
        self.model_name, self.expert_series_cap = model_name, expert_series_cap
        model = ["model_name"]
        Gauge("moecluster_num_requests_running", "Sequences in a batch: decoding, or their prompts prefilling.", model,
              registry=registry).labels(model_name).set_function(running)
        Gauge("moecluster_num_requests_waiting", "Sequences waiting for a batch slot.", model,
              registry=registry).labels(model_name).set_function(waiting)
        self.ttft = Histogram("moecluster_time_to_first_token_seconds", "Time to the first generated token.", model,
                              buckets=LATENCY_BUCKETS, registry=registry).labels(model_name)
        self.itl = Histogram("moecluster_inter_token_latency_seconds", "Time between two generated tokens.", model,
                             buckets=LATENCY_BUCKETS, registry=registry).labels(model_name)
        self.e2e = Histogram("moecluster_e2e_request_latency_seconds", "Time from arrival to the last token.", model,
                             buckets=REQUEST_BUCKETS, registry=registry).labels(model_name)
        self.prompt_tokens = Counter("moecluster_prompt_tokens", "Prompt tokens prefilled.", model,
                                     registry=registry).labels(model_name)
        self.generation_tokens = Counter("moecluster_generation_tokens", "Tokens generated.", model,
                                         registry=registry).labels(model_name)
        self.requests = Counter("moecluster_request_success", "Requests finished, by finish reason.",
                                [*model, "finished_reason"], registry=registry)
        self.failures = Counter("moecluster_request_failure", "Requests failed, by status.", [*model, "status"],
                                registry=registry)
        self.expert_tokens = Counter("moecluster_expert_tokens", "Token-expert pairs routed to each expert.",
                                     ["layer", "expert"], registry=registry)
        self.layer_tokens = Counter("moecluster_layer_tokens", "Token-expert pairs routed in each MoE layer.",
                                    ["layer"], registry=registry)
        self.layer_imbalance = Gauge("moecluster_expert_load_imbalance",
                                     "Max over mean tokens per expert of the layer, over the last report interval.",
                                     ["layer"], registry=registry)
        self.expert_replicas = Gauge("moecluster_expert_replicas", "Live replicas of each expert in the routing table.",
                                     ["layer", "expert"], registry=registry)
        self.forward_seconds = Histogram("moecluster_expert_forward_seconds",
                                         "One worker's share of a layer call, sent to answered.", ["worker"],
                                         buckets=LATENCY_BUCKETS, registry=registry)
        self.health = Counter("moecluster_expert_health_events", "What the health model did: ejections, probes, "
                              "probe_failures, readmissions, retries, hedges, hedges_won.", ["event"],
                              registry=registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def add_expert_tokens(self, tokens: dict[str, int], experts_per_layer: dict[int, int]) -> None:
        """Tokens per "layer:expert" since the last report."""
        per_layer: dict[int, list[int]] = {layer: [0] * n for layer, n in experts_per_layer.items()}
        for key, n in tokens.items():
            layer, expert = parse_expert_key(key)
            per_layer[layer][expert] += n
        per_expert = sum(experts_per_layer.values()) <= self.expert_series_cap
        for layer, counts in per_layer.items():
            total = sum(counts)
            if not total:
                continue
            self.layer_tokens.labels(str(layer)).inc(total)
            self.layer_imbalance.labels(str(layer)).set(max(counts) / (total / len(counts)))
            if per_expert:
                for expert, n in enumerate(counts):
                    if n:
                        self.expert_tokens.labels(str(layer), str(expert)).inc(n)

    def set_replicas(self, replicas: dict[int, list[list[int]]]) -> None:
        if sum(map(len, replicas.values())) > self.expert_series_cap:
            return
        for layer, hosts in replicas.items():
            for expert, workers in enumerate(hosts):
                self.expert_replicas.labels(str(layer), str(expert)).set(len(workers))

    def add_health(self, counters: dict[str, int]) -> None:
        for event, n in counters.items():
            if n:
                self.health.labels(event).inc(n)


def merge_replicas(texts: dict[str, bytes]) -> bytes:
    """Several serving replicas' metrics (text format, by replica id) as one text, each sample labelled with its
    `replica`: a scrape through Serve's proxy reaches one replica, and must see them all."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value, sample.timestamp)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected(list(families.values())))
    return generate_latest(registry)


class _Collected:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return self.families


class RequestTimer:
    """One request's latencies and tokens, into `metrics` as its events arrive."""

    def __init__(self, metrics: ServingMetrics, prompt_tokens: int):
        self.metrics, self.started, self.last = metrics, time.perf_counter(), None
        metrics.prompt_tokens.inc(prompt_tokens)

    def add(self, tokens: int, finish_reason: str | None) -> None:
        now, m = time.perf_counter(), self.metrics
        if self.last is None:
            m.ttft.observe(now - self.started)
            tokens_after_first, gap = tokens - 1, 0.0
        else:
            tokens_after_first, gap = tokens, (now - self.last) / max(tokens, 1)
        for _ in range(tokens_after_first):  # tokens that arrived together shared the time since the last
            m.itl.observe(gap)
        m.generation_tokens.inc(tokens)
        self.last = now
        if finish_reason:
            m.e2e.observe(now - self.started)
            m.requests.labels(m.model_name, finish_reason).inc()

    def failed(self, status: str) -> None:
        self.metrics.failures.labels(self.metrics.model_name, status).inc()
