"""Experts computed in the router's own process: the same dispatch and math, no Ray and no gRPC.

It measures what distribution costs (benchmarks) and stands in for the workers in tests.
"""

import time

import torch

from experts.bank import ExpertBank
from experts.layout import experts_modules
from router.client import LayerReplies, RepliesAtOnce
from router.dispatch import Dispatch
from router.remote import ExpertRouter
from router.seam import route_experts
from router.table import RoutingTable


class LocalExperts(RepliesAtOnce):
    """ExpertClient's contract, served by ExpertBanks in this process."""

    def __init__(self, banks: list[ExpertBank]):
        self.banks = banks

    def outstanding(self) -> dict[int, int]:
        return {}

    def drain_counters(self) -> dict[str, int]:
        return {}  # no hedges in one process

    def forward(self, layer: int, dispatch: Dispatch, rows: torch.Tensor, addresses, hedge=None, timeout_s=None):
        """The client's call, in this process: nothing to hedge or time out."""
        started, outs, start = time.perf_counter(), [], 0
        for worker, experts, counts in dispatch.per_worker():
            end = start + sum(counts)
            out = self.banks[worker].forward(layer, experts, counts, rows[start:end])
            outs.append(out.to(rows.device, rows.dtype))  # as a worker replies: the request's dtype
            start = end
        return LayerReplies(torch.cat(outs), time.perf_counter() - started)


def attach_local_experts(model, model_dir, dtype=None) -> ExpertRouter:
    """Host every routed expert of `model` in this process, in one bank on the model's device, and route to it."""
    layers = experts_modules(model)
    shape = {layer: m.num_experts for layer, m in layers.items()}
    plan = [[(layer, e) for layer, n in shape.items() for e in range(n)]]
    bank = ExpertBank(model_dir, plan[0], dtype, model.device)
    router = ExpertRouter(RoutingTable.from_plan(0, plan, {0: "local"}, shape), LocalExperts([bank]))
    route_experts(model, router)
    return router
