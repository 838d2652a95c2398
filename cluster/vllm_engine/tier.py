"""The expert tier inside vLLM's model worker process: one ExpertRouter per process, and the custom op through
which each MoE layer calls it.

vLLM compiles and runs the model in a worker process it starts itself, so the router is built there, from the plain
data the serving replica put in the engine's `additional_config` (`TierSpec`). The serving replica reaches it
between steps through vLLM's collective RPC (`TierWorker`): the load and health it reports, the routing tables it
is given.

T = tokens, K = experts per token, D = hidden
"""

import dataclasses
import os

import torch

from cluster.config import ServeConfig
from cluster.serving.router_policies import call_deadlines, hedge_policy
from protos.wire.unix_stream import FrameLimits
from router.client import ExpertClient
from router.remote import ExpertRouter
from router.table import RoutingTable

CONFIG_KEY = "moecluster"  # the tier's entry in vLLM's additional_config
_router: ExpertRouter | None = None  # this process's, built with its engine's model


@dataclasses.dataclass(frozen=True)
class TierSpec:
    """What a worker process needs to reach the expert workers, as plain data (vLLM hashes additional_config)."""

    key: str  # the version's data-path key
    timeout_s: float
    probe_timeout_s: float
    frame_limits: tuple[int, int]  # FrameLimits' message and tensor bytes
    table: dict  # table_data(RoutingTable)

    def data(self) -> dict:
        return dataclasses.asdict(self)


def table_data(table: RoutingTable) -> dict:
    return {"version": table.version, "addresses": {str(w): a for w, a in table.addresses.items()},
            "replicas": {str(layer): hosts for layer, hosts in table.replicas.items()}, "gone": sorted(table.gone)}


def table_of(data: dict) -> RoutingTable:
    return RoutingTable(data["version"], {int(w): a for w, a in data["addresses"].items()},
                        {int(layer): hosts for layer, hosts in data["replicas"].items()}, frozenset(data["gone"]))


def spec_in(additional_config: dict | None) -> TierSpec | None:
    data = (additional_config or {}).get(CONFIG_KEY)
    if data is None:
        return None
    return TierSpec(**{**data, "frame_limits": tuple(data["frame_limits"])})


def router_for(spec: TierSpec) -> ExpertRouter:
    """This process's router, built the first time a layer asks."""
    global _router
    if _router is None:
        client = ExpertClient(spec.timeout_s, spec.key, limits=FrameLimits(*spec.frame_limits))
        _router = ExpertRouter(table_of(spec.table), client, probe_timeout_s=spec.probe_timeout_s)
    return _router


@torch.library.custom_op("moecluster::route_experts", mutates_args=())
def route_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  layer: int) -> torch.Tensor:
    """[T, D] gate-weighted sum of each token's K experts, computed on the expert workers."""
    return _router.forward(layer, hidden, topk_ids.long(), topk_weights)


@route_experts.register_fake
def _(hidden, topk_ids, topk_weights, layer):
    return torch.empty_like(hidden)


class TierWorker:
    """Mixed into vLLM's worker (`worker_extension_cls`): what the serving replica asks of this process's router
    with `collective_rpc`, between engine steps."""

    def moecluster_report(self) -> dict:
        """The load and health since the last report, as the controller's RouterReport takes them."""
        experts, workers = _router.drain()
        return {"pid": os.getpid(), "version": _router.table.version, "experts": experts, "workers": workers,
                "timings": _router.timings.drain(), "counters": _router.drain_counters(),
                "ejected": sorted(_router.health.ejected())}

    def moecluster_update(self, table: dict) -> None:
        _router.update(table_of(table))

    def moecluster_configure(self, config: dict) -> None:
        """The live fields the router applies: hedging, deadlines."""
        config = ServeConfig.model_validate(config)
        _router.hedging = hedge_policy(config.hedge)
        _router.deadlines = call_deadlines(config)
        _router.client.timeout_s = config.expert_timeout_s
