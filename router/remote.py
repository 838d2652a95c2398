"""The expert router: one MoE layer's tokens grouped by worker and expert, sent to live replicas, combined.

`router.seam.route_experts` binds a model's experts modules to `ExpertRouter.forward`.
T = tokens, K = experts per token, S = T * K pairs, D = hidden
"""

import contextlib
import itertools
import threading
import time
from collections import Counter

import torch

from experts.keys import expert_key
from protos.wire.task_local import TaskLocal
from router.client import ExpertCallError
from router.dispatch import Dispatch, combine, plan_dispatch
from router.health import WorkerHealth
from router.deadline import CallDeadlines
from router.hedge import Hedge, HedgePolicy
from router.pingpong import pause
from router.replicas import NoReplica, assign_workers
from router.routing import RoutingPolicy
from router.shared import DeferredShared
from router.table import RoutingTable
from router.timeline import StepTimeline
from router.timings import LayerTimings


class ExpertRouter:
    """Sends each MoE layer's pairs to live replicas. A worker whose call fails is ejected (`health`) and only its
    share is sent again, to the experts' other replicas; ejected workers are probed in the background and
    readmitted when they answer."""

    def __init__(self, table: RoutingTable, client, policy: RoutingPolicy | None = None,
                 health: WorkerHealth | None = None, probe_timeout_s: float = 1.0, hedging: HedgePolicy | None = None,
                 deadlines: CallDeadlines | None = None, poison_lost: bool = False):
        """`hedging` None: a slow worker's share waits for it (or its deadline), never raced elsewhere.
        `deadlines` None: every call waits the client's whole deadline.
        `poison_lost`: a pair whose expert has no live replica gets a NaN output instead of failing the call with
        NoReplica, so that only its token's row is NaN (an engine that must not raise in its forward finds the
        requests that needed a lost expert by their NaN logits); `lost` then says why."""
        self.table, self.client = table, client
        self.poison_lost = poison_lost
        self.lost = ""  # why the last pair poisoned had no live replica
        self.deadlines = deadlines
        self.policy = policy or RoutingPolicy()
        self.health = health or WorkerHealth()
        self.hedging = hedging
        self.probe_timeout_s = probe_timeout_s
        self.counters: Counter[str] = Counter()  # retries: pairs sent again after their worker failed
        self._step = TaskLocal("step")  # token ids of the forward in progress in each engine task
        self._turns = itertools.count()
        self._probe_row: torch.Tensor | None = None  # [1, D] zeros in the model's dtype
        self._closed = threading.Event()
        self._stats_lock = threading.Lock()
        self.expert_tokens: dict[int, torch.Tensor] = {}  # layer -> [E] pairs routed since the last `drain`
        self.worker_rows: dict[int, int] = {}
        self.timings = LayerTimings()
        self.timeline = StepTimeline()  # records only while armed (cluster/tools/step_timeline.py)
        self.shared: dict[int, DeferredShared] = {}  # layer -> its shared expert, computed in its calls' gap
        threading.Thread(target=self._probe_loop, name="expert-probe", daemon=True).start()

    def update(self, table: RoutingTable) -> None:
        if table.version != self.table.version:
            old = self.table.addresses
            self.health.forget(w for w in old if table.addresses.get(w) != old[w])
            self.table = table

    def close(self) -> None:
        self._closed.set()
        self.health.changed.set()

    @contextlib.contextmanager
    def tokens(self, input_ids: torch.Tensor):
        """The token ids of the forward run in this block, in this thread (token-keyed policies route by them):
        they are the rows of every MoE layer's hidden states, in the same order."""
        self._step.vars()["token_ids"] = input_ids.reshape(-1)
        try:
            yield
        finally:
            self._step.vars()["token_ids"] = None

    def forward(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        token_ids = self._step.vars().get("token_ids")
        top_k_index, top_k_weights = self.policy.route(layer, hidden, top_k_index, top_k_weights, token_ids)
        top_k_index = top_k_index.cpu()  # the plan is host work: its expert ids and counts go on the wire as lists
        self._count(layer, top_k_index)
        if self._probe_row is None:
            self._probe_row = hidden.new_zeros(1, hidden.shape[-1])
        started = time.perf_counter()
        shared = self.shared.get(layer)
        try:
            pair_out, waited, compute_s, paused = self._expert_outputs(layer, hidden, top_k_index, shared)
        except BaseException:
            if shared is not None:
                shared.forget(hidden)
            raise
        received = time.perf_counter()
        combined = combine(pair_out, top_k_weights).to(hidden.dtype)
        ended = time.perf_counter()
        self.timings.add(dispatch=received - started - waited - paused, wait=max(0.0, waited - compute_s),
                         expert_compute=min(compute_s, waited), overlapped=paused, combine=ended - received)
        self.timeline.record("combine", layer, received, ended)
        return combined

    def _expert_outputs(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                        shared: DeferredShared | None):
        """([S, D] each pair's expert output in pair order, seconds waited on workers, their compute seconds,
        seconds the router computed meanwhile: the layer's `shared` expert, the step's other micro-batches).
        `top_k_index` is on the host; `hidden` and the outputs on the model's device."""
        flat, top_k, device = top_k_index.reshape(-1), top_k_index.shape[-1], hidden.device  # [S]
        out = hidden.new_empty(flat.numel(), hidden.shape[-1])  # [S, D]
        pending = torch.arange(flat.numel())  # [P] pairs still without an output
        waited = compute_s = paused = 0.0
        while pending.numel():
            planned_at = time.perf_counter()
            table = self.table
            if self.poison_lost:
                pending = self._poison_unreachable(layer, table, flat, pending, out)
                if not pending.numel():
                    break
            dispatch = self._plan(layer, table, flat[pending])
            sent_pairs = pending[dispatch.order]  # [P] in dispatch order
            rows = hidden.index_select(0, (sent_pairs // top_k).to(device))
            sent = time.perf_counter()
            call = self.client.send(layer, dispatch, rows, table.addresses, self._hedge(layer, table),
                                    self._timeout_s(layer, table))
            dispatched = time.perf_counter()
            self.timeline.record("dispatch", layer, planned_at, dispatched)
            if shared is not None:
                shared.compute(hidden)
                self.timeline.record("shared", layer, dispatched, time.perf_counter())
                shared = None  # once, however many rounds the call takes
            pause()  # the step's other micro-batches compute while the workers do
            resumed = time.perf_counter()
            replies = self.client.collect(call)
            self.timeline.record("wait", layer, resumed, time.perf_counter())
            paused += resumed - dispatched
            waited += time.perf_counter() - sent - (resumed - dispatched)
            if not replies.failed:
                self._observe(layer, time.perf_counter() - sent)
            compute_s += replies.compute_s
            self._count_workers(dispatch)
            if not replies.failed:  # the usual case: one scatter, no masks
                out.index_copy_(0, sent_pairs.to(device), replies.out)
                break
            failed = torch.zeros(len(sent_pairs), dtype=torch.bool)
            for error, a, b in replies.failed:
                if not error.retryable:
                    raise error
                self.health.eject(error.worker, str(error))
                failed[a:b] = True
            answered = (~failed).nonzero().squeeze(1)  # [A] rows of the call that have an output
            out.index_copy_(0, sent_pairs[answered].to(device), replies.out.index_select(0, answered.to(device)))
            pending = sent_pairs[failed]
            if pending.numel():
                with self._stats_lock:
                    self.counters["retries"] += int(pending.numel())
        if shared is not None:  # every pair was poisoned before a call went out
            shared.compute(hidden)
        return out, waited, compute_s, paused

    def _poison_unreachable(self, layer: int, table: RoutingTable, flat: torch.Tensor, pending: torch.Tensor,
                            out: torch.Tensor) -> torch.Tensor:
        """[P'] the `pending` pairs whose expert has a live replica; the others' rows of `out` [S, D] are NaN."""
        ejected, hosts = self.health.ejected(), table.replicas[layer]
        if not ejected and not table.gone:  # the usual case: every expert has its replicas
            return pending
        live = torch.tensor([any(w not in ejected for w in workers) for workers in hosts])  # [E]
        reachable = live[flat[pending]]  # [P]
        if bool(reachable.all()):
            return pending
        lost = pending[~reachable]
        expert = int(flat[lost[0]])
        self.lost = str(NoReplica(layer, expert, self._why_no_replica(table, hosts[expert])))
        out.index_fill_(0, lost.to(out.device), float("nan"))
        with self._stats_lock:
            self.counters["lost_pairs"] += int(lost.numel())
        return pending[reachable]

    def _timeout_s(self, layer: int, table: RoutingTable) -> float | None:
        if self.deadlines is None:
            return None
        return self.deadlines.timeout_s(layer, self._replicated_live(layer, table))

    def _replicated_live(self, layer: int, table: RoutingTable) -> bool:
        """Whether every expert of `layer` has another replica that is not ejected: a worker left as an expert's
        last live replica is given the whole deadline, never ejected for being slow (on a loaded machine it
        would be, and that expert would fail until a probe readmits it)."""
        ejected = self.health.ejected()
        if not ejected or layer not in table.replicated:
            return layer in table.replicated
        return all(sum(w not in ejected for w in hosts) > 1 for hosts in table.replicas[layer])

    def _observe(self, layer: int, seconds: float) -> None:
        if self.hedging is not None:
            self.hedging.observe(layer, seconds)
        if self.deadlines is not None:
            self.deadlines.observe(layer, seconds)

    def _plan(self, layer: int, table: RoutingTable, experts: torch.Tensor) -> Dispatch:
        ejected = self.health.ejected()
        hosts = table.replicas[layer]
        live = [[w for w in workers if w not in ejected] for workers in hosts]
        try:
            pair_worker = assign_workers(layer, experts, live, self.client.outstanding(), next(self._turns))
        except NoReplica as error:
            raise NoReplica(layer, error.expert, self._why_no_replica(table, hosts[error.expert])) from None
        return plan_dispatch(experts, pair_worker, len(live))

    def _why_no_replica(self, table: RoutingTable, hosts: list[int]) -> str:
        failure = next((reason for reason in map(self.health.reason, hosts) if reason), "")
        if failure:
            return f"last replica failed: {failure}"
        return f"expert workers {sorted(table.gone)} are gone and being replaced" if table.gone else ""

    def _hedge(self, layer: int, table: RoutingTable) -> Hedge | None:
        after_s = self.hedging.after_s(layer) if self.hedging is not None else None
        if after_s is None or layer not in table.hedgeable:
            return None
        hosts = table.replicas[layer]

        def reroute(experts: list[int], avoid: set[int]) -> dict[int, int] | None:
            out, ejected, load = {}, self.health.ejected(), self.client.outstanding()
            for expert in experts:
                options = [w for w in hosts[expert] if w not in avoid and w not in ejected]
                if not options:
                    return None
                out[expert] = min(options, key=lambda w: load.get(w, 0))
            return out

        return Hedge(after_s, reroute, self.hedging.take)

    def _probe_loop(self) -> None:
        while not self._closed.is_set():
            self.health.changed.wait(self.health.next_due_s())
            self.health.changed.clear()
            for worker in self.health.due():
                self.health.probed(worker, self._probe(worker))

    def _probe(self, worker: int) -> str | None:
        """None when `worker` answers a one-row Forward through an expert it hosts, else why not."""
        table = self.table
        hosted = next(((layer, e) for layer, hosts in table.replicas.items() for e, workers in enumerate(hosts)
                       if worker in workers), None)
        if hosted is None or worker not in table.addresses or self._probe_row is None:
            return None  # nothing to route to it: nothing to keep it out of
        try:
            self.client.probe(worker, table.addresses[worker], *hosted, self._probe_row, self.probe_timeout_s)
        except ExpertCallError as error:
            return str(error)
        return None

    def _count(self, layer: int, top_k_index: torch.Tensor) -> None:
        counts = torch.bincount(top_k_index.reshape(-1), minlength=len(self.table.replicas[layer]))
        with self._stats_lock:
            self.expert_tokens[layer] = self.expert_tokens.get(layer, 0) + counts

    def _count_workers(self, dispatch) -> None:
        with self._stats_lock:
            for worker, count in zip(dispatch.workers, dispatch.counts):
                self.worker_rows[worker] = self.worker_rows.get(worker, 0) + count

    def drain_counters(self) -> dict[str, int]:
        """The health model's counters, the retries and the hedges since the last drain."""
        with self._stats_lock:
            retries, self.counters = dict(self.counters), Counter()
        return {**self.health.drain_counters(), **retries, **self.client.drain_counters()}

    def drain(self) -> tuple[dict[str, int], dict[int, int]]:
        """Tokens per "layer:expert" and rows per worker since the last drain, as plain data for reports."""
        with self._stats_lock:
            experts, self.expert_tokens = self.expert_tokens, {}
            workers, self.worker_rows = self.worker_rows, {}
        counts = {expert_key(layer, e): n for layer, t in experts.items() for e, n in enumerate(t.tolist()) if n}
        return counts, workers
