"""The seam between transformers and moecluster: an experts implementation that runs routed experts remotely.

Every family decorated with `@use_experts_implementation` calls the registered function with
(hidden_states, top_k_index, top_k_weights) after its own gate, so the model's routing stays transformers'.
T = tokens, K = experts per token, E = experts, D = hidden
"""

import functools
import itertools
import threading
import time

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from experts.layout import experts_paths
from router.client import ExpertCallError
from router.dispatch import combine, gather_rows, plan_dispatch
from router.replicas import assign_workers
from router.routing import RoutingPolicy
from router.table import RoutingTable
from router.timings import LayerTimings

IMPLEMENTATION = "moecluster"


class ExpertRouter:
    """Sends each MoE layer's pairs to live replicas; a failed replica's share is retried on the others."""

    def __init__(self, table: RoutingTable, client, policy: RoutingPolicy | None = None):
        self.table, self.client = table, client
        self.policy = policy or RoutingPolicy()
        self._step = threading.local()  # token ids of the forward in progress in each engine thread
        self._suspect: set[int] = set()
        self._turns = itertools.count()
        self._last_failure = ""
        self._stats_lock = threading.Lock()
        self.expert_tokens: dict[int, torch.Tensor] = {}  # layer -> [E] pairs routed since the last `drain`
        self.worker_rows: dict[int, int] = {}
        self.timings = LayerTimings()

    def update(self, table: RoutingTable) -> None:
        if table.version != self.table.version:
            self.table, self._suspect, self._last_failure = table, set(), ""

    def attach(self, model) -> None:
        """Route `model`'s experts modules here, and time its gates."""
        for layer, path in experts_paths(model).items():
            model.get_submodule(path).remote = functools.partial(self.forward, layer)
            block = model.get_submodule(path.rpartition(".")[0])
            for gate in ("gate", "router"):
                if isinstance(getattr(block, gate, None), torch.nn.Module):
                    self.timings.gate_hooks(getattr(block, gate))

    def set_token_ids(self, input_ids: torch.Tensor) -> None:
        self._step.token_ids = input_ids.reshape(-1)  # rows of every MoE layer's hidden states, same order

    def forward(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        token_ids = getattr(self._step, "token_ids", None)
        top_k_index, top_k_weights = self.policy.route(layer, hidden, top_k_index, top_k_weights, token_ids)
        self._count(layer, top_k_index)
        while True:
            try:
                return self._call(layer, hidden, top_k_index, top_k_weights)
            except ExpertCallError as error:
                if not error.retryable:
                    raise
                self._suspect.add(error.worker)  # the next try goes to the experts' other replicas
                self._last_failure = str(error)

    def _call(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        started, table = time.perf_counter(), self.table
        live = [[w for w in hosts if w not in self._suspect] for hosts in table.replicas[layer]]
        pair_worker = assign_workers(layer, top_k_index, live, self.client.outstanding(), next(self._turns),
                                     self._last_failure)
        dispatch = plan_dispatch(top_k_index, pair_worker, len(live))
        rows = gather_rows(hidden, dispatch, top_k_index.shape[-1])
        sent = time.perf_counter()
        out, compute_s = self.client.forward(layer, dispatch, rows, table.addresses)
        self._count_workers(dispatch)
        received = time.perf_counter()
        combined = combine(out, dispatch, top_k_weights).to(hidden.dtype)
        self.timings.add(dispatch=sent - started, wait=received - sent - compute_s, expert_compute=compute_s,
                         combine=time.perf_counter() - received)
        return combined

    def _count(self, layer: int, top_k_index: torch.Tensor) -> None:
        counts = torch.bincount(top_k_index.reshape(-1), minlength=len(self.table.replicas[layer]))
        with self._stats_lock:
            self.expert_tokens[layer] = self.expert_tokens.get(layer, 0) + counts

    def _count_workers(self, dispatch) -> None:
        with self._stats_lock:
            for worker, count in zip(dispatch.workers, dispatch.counts):
                self.worker_rows[worker] = self.worker_rows.get(worker, 0) + count

    def drain(self) -> tuple[dict[str, int], dict[int, int]]:
        """Tokens per "layer:expert" and rows per worker since the last drain, as plain data for reports."""
        with self._stats_lock:
            experts, self.expert_tokens = self.expert_tokens, {}
            workers, self.worker_rows = self.worker_rows, {}
        counts = {f"{layer}:{e}": n for layer, t in experts.items() for e, n in enumerate(t.tolist()) if n}
        return counts, workers


def _remote_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    return module.remote(hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _remote_experts_forward)
