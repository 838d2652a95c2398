"""The serving config: one schema for the CLI, the Python API and the Helm chart's serveConfigV2."""

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from experts.keys import parse_expert_key

ExpertKey = Annotated[str, Field(pattern=r"^\d+:\d+$", description='"layer:expert", e.g. "3:7"')]
ReplicaCount = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoutingConfig(_Strict):
    policy: Literal["model", "hash", "balanced", "kmeans"] = Field(
        "model", description="Which experts each token goes to: the checkpoint's own gate, a seeded hash of the "
        "token id, a balanced assignment of gate affinities, or the nearest k-means centroids.",
    )
    capacity_factor: float | None = Field(
        None, gt=0, description="Caps each expert at capacity_factor * tokens * top_k / experts per batch; unset: no cap."
    )
    overflow: Literal["reroute", "drop"] = Field(
        "reroute", description="Tokens over an expert's capacity go to their next-best expert with room, or are dropped."
    )
    hash_seed: int = Field(0, description="Seed of the hash policy; the same seed routes the same way everywhere.")
    centroids: str | None = Field(
        None, description="k-means centroids file; unset: moecluster-centroids.safetensors beside the checkpoint."
    )


class RebalanceConfig(_Strict):
    enabled: bool = Field(False, description="Rebalance replicas by load on a timer.")
    interval_s: float = Field(60.0, gt=0, description="Seconds between automatic rebalances.")
    window_s: float = Field(60.0, gt=0, description="Sliding window over which tokens per expert are counted.")
    max_total_replicas: int | None = Field(
        None, ge=1, description="Budget of expert replicas over all (layer, expert); unset: 1.5x the number of experts."
    )


class HedgeConfig(_Strict):
    enabled: bool = Field(
        True, description="Race a slow worker's share against other replicas of its experts; the first answer wins. "
        "Only experts with 2 or more replicas can be hedged.",
    )
    factor: float = Field(4.0, gt=1, description="Hedge a share once it takes this many times the layer's median call.")
    min_ms: float = Field(20.0, gt=0, description="Never hedge a share sooner than this (milliseconds).")
    budget: float = Field(
        0.05, gt=0, le=1, description="Hedges per layer call at most, on average: the extra load hedging may add."
    )


class CallDeadlineConfig(_Strict):
    enabled: bool = Field(
        True, description="Where every expert of a layer has another replica, give a worker's share a multiple of "
        "the layer's recent p99 instead of the whole expert_timeout_s: a silent worker (a host cut off, a process "
        "stopped) is then ejected and its share sent to the other replicas within about a second.",
    )
    factor: float = Field(8.0, gt=1, description="The deadline is this many times the layer's recent p99 call.")
    floor_ms: float = Field(1000.0, gt=0, description="Never less than this (milliseconds).")


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest HTTP request body; a larger one is a 400.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt in tokens; unset: the model's context less one."
    )
    max_tokens: int | None = Field(None, ge=1, description="Largest max_tokens a request may ask; unset: the context.")
    max_n: int = Field(16, ge=1, description="Most choices (n) one request may ask for.")
    max_prompts: int = Field(
        64, ge=1, description="Most prompts one /v1/completions or gRPC Generate request may batch (each prompt "
        "has its n choices).",
    )
    streams_per_connection: int = Field(
        64, ge=1, description="gRPC Generate calls one client connection may have in flight on one serving replica; "
        "more are RESOURCE_EXHAUSTED.",
    )
    frame_message_bytes: int = Field(
        64 << 20, ge=1 << 16, description="Largest protobuf message of an expert call's Unix-socket frame (and its "
        "gRPC message's, less the rows).",
    )
    frame_tensor_bytes: int = Field(
        16 << 30, ge=1 << 20, description="Largest tensor payload of an expert call's Unix-socket frame and gRPC "
        "message (the rows of one layer call to one worker).",
    )


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=1, description="Fewest serving replicas.")
    max_replicas: int = Field(2, ge=1, description="Most serving replicas.")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="Requests in flight per serving replica that autoscaling aims at.",
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="How long load must stay high before a replica is added.")
    downscale_delay_s: float = Field(60.0, ge=0, description="How long load must stay low before one is removed.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


# Fields of moecluster's own engine that the vLLM engine does not take (yet): refused there unless left at their
# defaults, so none is accepted and silently ignored.
NOT_ON_VLLM = ("engine_lanes", "prefill_chunk_tokens", "kv_cache_memory_fraction", "prefix_cache_tokens",
               "stream_interval", "serving_gpus", "routing")


class ServeConfig(_Strict):
    engine: Literal["moecluster", "vllm"] = Field(
        "moecluster", description="What runs the dense part of the model (embeddings, attention, KV cache, gates, "
        "lm_head) in each serving replica: moecluster's own engine on transformers, or vLLM's engine (the `vllm` "
        "extra), whose MoE layers call the same expert workers and whose OpenAI API the replica serves.",
    )
    model: str | None = Field(None, description="Checkpoint directory; unset serves the embedded default model.")
    model_name: str | None = Field(
        None, description="Model id served and reported by /v1/models; unset: the checkpoint directory's name "
        "(moecluster-default for the embedded model).",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Compute dtype; auto keeps the checkpoint's own (float16 runs as float32 on CPU)."
    )
    num_workers: int = Field(2, ge=1, description="Expert worker actors; each hosts a share of the expert replicas.")
    worker_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each expert worker.")
    worker_gpus: float = Field(1.0, ge=0, description="GPUs per expert worker, used only where the cluster has GPUs.")
    worker_memory_gb: float | None = Field(
        None, gt=0, description="Expert weight budget per worker; a plan that does not fit is refused at start-up."
    )
    worker_threads: int | None = Field(
        None, ge=1, description="Torch threads per worker; unset shares its node's cores among the workers that "
        "compute at once there (those on the node with placement spread, one with by_layer).",
    )
    serving_threads: int | None = Field(None, ge=1, description="Torch threads of the serving replica.")
    serving_gpus: float = Field(
        0.0, ge=0, le=1, description="GPUs Ray reserves for each serving replica (a fraction shares one). With one, "
        "the dense model (embeddings, attention, KV cache, gates, lm_head) and sampling run on it, and the replica "
        "can only be placed on a node that has one; 0: on the replica's CPUs.",
    )
    placement: Literal["auto", "spread", "by_layer"] = Field(
        "auto", description="spread: each layer's experts over every worker, which compute a layer at once; "
        "by_layer: each layer on as few workers as an even load allows, so a layer makes fewer calls; auto: "
        "by_layer where workers share a node, spread where each has its own.",
    )
    num_replicas: int = Field(
        1, ge=1, description="Serving replicas (each runs the dense model, the engine and a router), all sharing "
        "one set of expert workers. Not with autoscaling.",
    )
    autoscaling: AutoscalingConfig | None = Field(
        None, description="Scale the serving replicas with load between min_replicas and max_replicas (Serve's "
        "autoscaling) instead of a fixed num_replicas.",
    )
    default_replicas: int = Field(1, ge=1, description="Replicas of every expert not listed in expert_replicas.")
    expert_replicas: dict[ExpertKey, ReplicaCount] = Field(
        default_factory=dict, json_schema_extra={"additionalProperties": False},
        description='Replicas of individual experts, as {"layer:expert": count}; others get default_replicas.',
    )
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    rebalance: RebalanceConfig = Field(default_factory=RebalanceConfig)
    expert_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of each router-to-worker call; where an expert has other replicas, "
        "call_deadline shortens it.",
    )
    call_deadline: CallDeadlineConfig = Field(default_factory=CallDeadlineConfig)
    hedge: HedgeConfig = Field(default_factory=HedgeConfig)
    startup_timeout_s: float = Field(300.0, gt=0, description="How long workers may take to be placed and load.")
    max_batch_size: int = Field(64, ge=1, description="Sequences decoded together in one step, over all lanes.")
    engine_lanes: int = Field(
        1, ge=1, description="Micro-batches stepped in ping-pong, so one computes while another waits on experts."
    )
    max_waiting: int = Field(
        1024, ge=1, description="Sequences (each prompt's each choice) queued for a batch slot before "
        "RESOURCE_EXHAUSTED.",
    )
    prefill_chunk_tokens: int = Field(
        64, ge=1, description="Most prompt tokens a step prefills while sequences decode (chunked prefill): a long "
        "prompt is prefilled over several steps, so running streams never wait for its whole prefill; with none "
        "decoding, prompts are prefilled whole. Larger: longer gaps in running streams while prompts arrive; "
        "smaller: slower long prefills.",
    )
    kv_cache_tokens: int | None = Field(
        None, ge=1, description="KV-cache positions of the serving replica's batches, padding included. Requests "
        "are admitted as far as it has room for their prompts; a step that would pass it preempts the newest "
        "sequences, which wait again and are prefilled again. Unset: kv_cache_memory_fraction of the memory free "
        "at start.",
    )
    kv_cache_memory_fraction: float = Field(
        0.4, gt=0, le=1, description="Share of the memory free at start (the GPU's, or the host's) that an unset "
        "kv_cache_tokens takes.",
    )
    prefix_cache_tokens: int | None = Field(
        None, ge=0, description="KV-cache positions of prompt prefixes (whole blocks of 16 tokens) kept for "
        "requests that share them, least recently used out first; 0: none. Unset: a quarter of kv_cache_tokens.",
    )
    stream_interval: int = Field(
        1, ge=1, description="Fewest tokens per streamed message after the first (a stream that fell behind sends "
        "all it has at once); more cut the ingress's CPU per token."
    )
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request leaves it unset.")
    api_keys_file: str | None = Field(
        None, description="File of API keys, one a line, that clients send as Authorization: Bearer KEY (with "
        "MOECLUSTER_API_KEY's); no key at all leaves the APIs open.",
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    metrics_open: bool = Field(False, description="Serve /metrics without an API key even when keys are set.")
    metrics_expert_series: int = Field(
        4096, ge=0, description="Most (layer, expert) series /metrics exports; a model with more routed experts "
        "exports tokens per layer, with each layer's max/mean imbalance, instead.",
    )

    @model_validator(mode="after")
    def _one_way_to_scale(self):
        if self.autoscaling is not None and self.num_replicas > 1:
            raise ValueError("set num_replicas or autoscaling, not both")
        return self

    @model_validator(mode="after")
    def _engine_takes_fields(self):
        if self.engine == "vllm":
            changed = [name for name in NOT_ON_VLLM if getattr(self, name) != type(self).model_fields[name].get_default(
                call_default_factory=True)]
            if changed:
                raise ValueError(f"engine vllm does not take {', '.join(changed)} (yet): leave them unset, or use "
                                 "engine moecluster")
        return self

    def most_serving_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.num_replicas

    def replica_counts(self) -> dict[tuple[int, int], int]:
        return {parse_expert_key(key): n for key, n in self.expert_replicas.items()}


def choices(model: type[BaseModel], field: str) -> tuple[str, ...]:
    """The values a Literal field of `model` accepts, for command-line choices."""
    return get_args(model.model_fields[field].annotation)


# How a change of each field reaches a running deployment. Every field not named here belongs to the version: it
# shapes the expert workers or the serving replica's process, so a change rolls out a new version beside the old.
LIVE_FIELDS = frozenset({
    "default_replicas", "expert_replicas", "routing", "rebalance", "expert_timeout_s", "call_deadline", "hedge",
    "max_batch_size", "max_waiting", "stream_interval", "default_max_tokens", "api_keys_file", "limits",
    "metrics_open", "prefill_chunk_tokens", "kv_cache_tokens", "kv_cache_memory_fraction", "prefix_cache_tokens",
})  # applied in place by every replica (Serve's user_config)
SCALING_FIELDS = frozenset({"num_replicas", "autoscaling"})  # Serve's own options for the serving replicas
WORKER_LIMITS = frozenset({"frame_message_bytes", "frame_tensor_bytes"})  # limits the workers' servers are built with


def version_args(config: ServeConfig) -> dict:
    """The fields that make a version: those neither live nor scaling, and the limits the workers start with."""
    fields = config.model_dump(exclude=LIVE_FIELDS | SCALING_FIELDS)
    fields["limits"] = config.limits.model_dump(include=WORKER_LIMITS)
    return fields


def live_fields(config: ServeConfig) -> dict:
    fields = config.model_dump(include=LIVE_FIELDS)
    fields["limits"] = config.limits.model_dump(exclude=WORKER_LIMITS)
    return fields


def with_live(version: dict, live: dict) -> ServeConfig:
    """The whole config of a replica: its version's fields and the live ones Serve last gave it."""
    unknown = set(live) - LIVE_FIELDS
    if unknown:
        raise ValueError(f"not live fields (they need a new version, set them in the application's args): "
                         f"{', '.join(sorted(unknown))}")
    limits = {**version.get("limits", {}), **live.get("limits", {})}
    return ServeConfig.model_validate({**version, **live, "limits": limits})
