"""The expert tier inside vLLM's model worker process: one ExpertRouter per process, and the custom op through
which each MoE layer calls it.

vLLM compiles and runs the model in a worker process it starts itself, so the router is built there, from the plain
data the serving replica put in the engine's `additional_config` (`TierSpec`). It checks in with the serving replica
over a Unix socket of the replica's (`report_socket`), never through vLLM's engine loop, which would keep the engine's
processes spinning: every REPORT_INTERVAL_S one line of JSON with its load and health out, one line back with a newer
routing table or newer live settings, if any.

T = tokens, K = experts per token, D = hidden
"""

import dataclasses
import json
import logging
import os
import socket
import threading
import time

import torch

from cluster.config import ServeConfig
from cluster.serving.router_policies import call_deadlines, hedge_policy
from protos.wire.unix_stream import FrameLimits
from router.client import ExpertClient
from router.remote import ExpertRouter
from router.table import RoutingTable

log = logging.getLogger(__name__)
CONFIG_KEY = "moecluster"  # the tier's entry in vLLM's additional_config
REPORT_INTERVAL_S = 0.2
_router: ExpertRouter | None = None  # this process's, built with its engine's model


@dataclasses.dataclass(frozen=True)
class TierSpec:
    """What a worker process needs to reach the expert workers, as plain data (vLLM hashes additional_config)."""

    key: str  # the version's data-path key
    timeout_s: float
    probe_timeout_s: float
    frame_limits: tuple[int, int]  # FrameLimits' message and tensor bytes
    table: dict  # table_data(RoutingTable)
    report_socket: str  # the serving replica's Unix socket (abstract: a leading NUL)

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
        _router = ExpertRouter(table_of(spec.table), client, probe_timeout_s=spec.probe_timeout_s, poison_lost=True)
        threading.Thread(target=_check_in, args=(_router, spec.report_socket), name="tier-report",
                         daemon=True).start()
    return _router


def lost_why() -> str:
    """Why the last token this process poisoned had no expert ("" while none was)."""
    return _router.lost if _router is not None else ""


@torch.library.custom_op("moecluster::route_experts", mutates_args=())
def route_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  layer: int) -> torch.Tensor:
    """[T, D] gate-weighted sum of each token's K experts, computed on the expert workers. It never raises: vLLM's
    engine dies of an exception in its forward. A token that needed an expert with no live replica gets a NaN row,
    which attention carries to its request's logits alone (cluster/vllm_engine/lost.py finds them there)."""
    try:
        return _router.forward(layer, hidden, topk_ids.long(), topk_weights)
    except Exception as error:  # the call failed whole (a request the router built wrongly): every token's row
        _router.lost = f"layer {layer}: {error}"
        log.error("MoE layer %d failed whole, its tokens' requests fail: %s", layer, error)
        return torch.full_like(hidden, float("nan"))


@route_experts.register_fake
def _(hidden, topk_ids, topk_weights, layer):
    return torch.empty_like(hidden)


def report(router: ExpertRouter) -> dict:
    """The load and health since the last report, as the controller's RouterReport takes them."""
    experts, workers = router.drain()
    return {"pid": os.getpid(), "version": router.table.version, "experts": experts,
            "workers": {str(w): rows for w, rows in workers.items()}, "timings": router.timings.drain(),
            "counters": router.drain_counters(), "ejected": sorted(router.health.ejected())}


def apply_reply(router: ExpertRouter, reply: dict) -> None:
    """A newer routing table, and the live settings the router applies (hedging, deadlines), when the replica
    has them."""
    if reply.get("table") is not None:
        router.update(table_of(reply["table"]))
    if reply.get("config") is not None:
        config = ServeConfig.model_validate(reply["config"])
        router.hedging = hedge_policy(config.hedge)
        router.deadlines = call_deadlines(config)
        router.client.timeout_s = config.expert_timeout_s


def _check_in(router: ExpertRouter, path: str) -> None:
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                lines = sock.makefile("r")
                while True:
                    time.sleep(REPORT_INTERVAL_S)
                    sock.sendall(json.dumps(report(router)).encode() + b"\n")
                    line = lines.readline()
                    if not line:
                        break
                    apply_reply(router, json.loads(line))
        except OSError as error:
            log.warning("the serving replica's report socket is unreachable, trying again: %s", error)
        time.sleep(1.0)
