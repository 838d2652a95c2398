"""The expert controller: one per version of an application, owning that version's expert workers, placement plan
and routing table. It scales replicas, rebalances them by load, and replaces workers that die.

It is a Serve deployment-scoped actor, named by the deployment's code version: Serve starts it (and so its
workers) before the version's first serving replica, and stops it once the version's last replica is gone. A
replica therefore only ever routes to its own version's workers, and a rollout brings up the new version's workers
while the old version still serves.

Changes follow one order, so no request in flight fails or stalls: load the new replicas, publish the new
routing table and wait for the routers to take it, then retire the old replicas.

It is no single point of failure: when it dies, Serve starts it again and it adopts the workers (detached actors)
and the plan it saved (`plan_store`); routers serve with their last table meanwhile.
"""

import logging
import math
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.config import DeploymentActorConfig

from cluster.config import ServeConfig, with_live
from cluster.control import plan_store
from cluster.control.load_window import TokenWindow
from cluster.control.placement import (
    PlanError,
    WorkerSlot,
    plan_placement,
    rebalance_counts,
    replica_counts,
    worker_loads,
)
from cluster.control.workers import WorkerSlots, worker_device
from experts.keys import expert_key, parse_expert_key
from experts.layout import expert_nbytes, moe_shape
from experts.model_ref import ModelRef
from router.health import COUNTERS as ROUTER_COUNTERS
from router.table import RoutingTable
from router.timings import merge, per_call_ms

log = logging.getLogger(__name__)
ROUTER_TTL_S = 5.0
ATTACHED_TTL_S = 60.0  # an attached router silent this long died without releasing its version's workers
CONTROLLER = "expert-controller"  # its name among the deployment's actors
REPLACE_BACKOFF_S = (1.0, 30.0)  # first and longest wait before trying a failed replacement again
HEALTH_COUNTERS = (*ROUTER_COUNTERS, "retries", "lost_pairs", "hedges", "hedges_won", "replacements",
                   "replacement_failures")


@dataclass(frozen=True)
class RouterReport:
    """What a router (a Serve replica) tells the controller at each check-in."""

    router: str
    node_id: str
    pid: int
    version: int  # of the routing table it routes with
    expert_tokens: dict[str, int]  # "layer:expert" -> tokens since the last report
    worker_rows: dict[int, int]  # worker -> rows since the last report
    timings: dict  # LayerTimings.drain()
    counters: dict[str, int]  # the health model's, since the last report
    ejected: list[int]  # workers it keeps out of its choices now
    metrics: bytes | None = None  # its Prometheus metrics, in the text format, every few reports


class ExpertController:
    def __init__(self, version: dict):
        """`version`: the version's fields of the serving config (`config.version_args`); the live ones come from
        the serving replicas (`set_live`)."""
        context = serve.get_deployment_actor_context()
        self.app, self.code_version = context.app_name, context.code_version or "local"
        self.scope = f"{self.app}:{self.code_version[:12]}"
        self._version_fields = version
        self.config = with_live(version, plan_store.load_live(self.scope))
        self.model = ModelRef.here(self.config.model)
        self.model_dir = self.model.local()
        self.shape = moe_shape(self.model_dir)
        self.expert_bytes = expert_nbytes(self.model_dir, self.config.dtype, worker_device(self.config))
        self.version = 0
        self._start()
        self.window = TokenWindow(self.config.rebalance.window_s)
        self.worker_rows: Counter = Counter()  # rows per worker since the plan last changed
        self.routers: dict[str, tuple[int, float]] = {}  # router id -> (table version, last report time)
        self.layer_timings: dict = {}  # summed over every MoE layer call since start
        self.counters: Counter[str] = Counter()  # the health model's doings, the routers' summed with ours
        self.router_info: dict[str, dict] = {}  # router id -> where it runs, and the workers it keeps out now
        self.router_metrics: dict[str, bytes] = {}  # router id -> its last Prometheus metrics
        self.attached: set[str] = set()  # routers that attached and have not released: they may still serve
        self._lock = threading.RLock()  # plan changes: held for as long as one takes
        self._stats_lock = threading.Lock()  # what reports add to: never held for long
        self._replace_at, self._replace_failures, self.replace_error = 0.0, 0, ""
        self.started_at = time.time()
        threading.Thread(target=self._watch, name="controller-watch", daemon=True).start()

    def _start(self) -> None:
        """Adopt the workers and plan of this version's previous controller, or place and load new ones."""
        saved = plan_store.load(self.scope)
        owner = (ray.get_runtime_context().get_actor_name(), SERVE_NAMESPACE)  # Serve names it in its namespace
        self.slots = WorkerSlots(self.config, self.model, self.scope, owner, adopt=saved is not None)
        if self.slots.adopted:
            self.version, self.plan, self.counts = saved
            self.version += 1  # addresses may have changed while no controller ran
            self.slots.adopt(self.plan)
            log.warning("controller restarted: adopted workers %s of plan v%d", sorted(self.slots.actors), saved[0])
        else:
            self.counts = replica_counts(self.shape, self.config.replica_counts(), self.config.default_replicas)
            self.plan = plan_placement(self.counts, self._worker_slots(), self.expert_bytes,
                                       by_layer=self.slots.by_layer)
            self.slots.start(self.plan)
            self.version += 1
        self.table = self._table()
        plan_store.save(self.scope, self.version, self.plan, self.counts)
        self.freed = False

    # --- routers ---

    def attach(self, router: str) -> RoutingTable:
        """A serving replica of this version starts: the routing table, with workers placed again if the version's
        last replica had released them (Serve replaced it by a new one)."""
        with self._lock:
            if self.freed:
                log.warning("a serving replica came back after the last one left: placing the workers again")
                self._start()
            with self._stats_lock:
                self.routers.setdefault(router, (self.table.version, time.monotonic()))
                self.attached.add(router)
            return self.table

    def routing_table(self) -> RoutingTable:
        return self.table

    def started(self) -> float:
        """When this controller started (wall clock): the newest one belongs to the newest version."""
        return self.started_at

    def model_ref(self) -> ModelRef:
        """The checkpoint this version serves, for each serving replica to find on its own node."""
        return self.model

    def data_path_key(self) -> str:
        return plan_store.data_path_key(self.scope)

    def report(self, report: RouterReport):
        """A router's periodic check-in: its load and health in, a newer routing table out (or None)."""
        with self._stats_lock:
            self.routers[report.router] = (report.version, time.monotonic())
            self.router_info[report.router] = {"router": report.router, "node_id": report.node_id, "pid": report.pid,
                                               "table_version": report.version, "ejected": report.ejected}
            self.window.add(report.expert_tokens)
            self.worker_rows.update(report.worker_rows)
            self.layer_timings = merge(self.layer_timings, report.timings)
            self.counters.update(report.counters)
            if report.metrics is not None:
                self.router_metrics[report.router] = report.metrics
        table = self.table
        return table if table.version != report.version else None

    # --- operators ---

    def scale(self, changes: dict[str, int]) -> dict:
        """Set replica counts of some experts ({"layer:expert": n}); the others keep theirs."""
        with self._lock:
            counts = {**self.counts, **_pairs(changes)}
            return self._replan(replica_counts(self.shape, counts), previous=self.plan)

    def set_live(self, live: dict) -> dict:
        """The serving config's live fields, as Serve last gave them to the replicas: rebalancing and the replica
        counts (listed experts get theirs, all others the default)."""
        with self._lock:
            config = with_live(self._version_fields, live)
            replicas_changed = (config.default_replicas, config.expert_replicas) != (
                self.config.default_replicas, self.config.expert_replicas)
            if config.rebalance.window_s != self.config.rebalance.window_s:
                with self._stats_lock:
                    self.window = TokenWindow(config.rebalance.window_s)
            self.config = config
            plan_store.save_live(self.scope, live)
            counts = replica_counts(self.shape, config.replica_counts(), config.default_replicas)
            if not replicas_changed or counts == self.counts or self.freed:
                return self._status()
            return self._replan(counts, previous=self.plan)

    def rebalance(self) -> dict:
        """Turn the window's tokens per expert into replica counts and a placement, and apply them."""
        with self._lock:
            with self._stats_lock:
                totals = self.window.totals()
            tokens = {pair: float(totals.get(expert_key(*pair), 0)) for pair in self.counts}
            counts = rebalance_counts(tokens, self._replica_budget(), len(self.plan))
            return self._replan(counts, load=tokens)

    def status(self) -> dict:
        return self._status()

    def replica_metrics(self) -> dict[str, bytes]:
        """The last metrics of every serving replica still reporting, by replica id."""
        live = self._live_routers()
        with self._stats_lock:
            self.router_metrics = {router: text for router, text in self.router_metrics.items() if router in live}
            return dict(self.router_metrics)

    def release(self, router: str) -> bool:
        """A serving replica is going away; the last one out frees the workers, their placement group and the
        saved plan (Serve then stops this controller, unless it starts another replica of this version)."""
        with self._lock:
            with self._stats_lock:
                self.routers.pop(router, None)
                self.router_metrics.pop(router, None)
                self.attached.discard(router)
            if self._attached_routers() or self.freed:
                return False
            log.info("the last serving replica of %s left: freeing its expert workers", self.scope)
            self.slots.shutdown()
            plan_store.delete(self.scope)
            self.freed = True
            return True

    # --- internals ---

    def _replan(self, counts, load=None, previous=None) -> dict:
        plan = plan_placement(counts, self._worker_slots(), self.expert_bytes, load=load, previous=previous,
                              by_layer=self.slots.by_layer)
        adds = [sorted(set(new) - set(old)) for new, old in zip(plan, self.plan)]
        removes = [sorted(set(old) - set(new)) for new, old in zip(plan, self.plan)]
        self.slots.call_each("load", adds)
        self.plan, self.counts = plan, counts
        plan_store.save(self.scope, self.version + 1, plan, counts)
        self._publish()
        self.slots.call_each("unload", removes)
        return self._status()

    def _publish(self) -> None:
        self.version += 1
        self.table = self._table()
        with self._stats_lock:
            self.worker_rows = Counter()
        deadline = time.monotonic() + 2 * ROUTER_TTL_S
        while time.monotonic() < deadline and any(v < self.version for v in self._live_routers().values()):
            time.sleep(0.05)

    def _attached_routers(self) -> set[str]:
        """Attached routers, less those silent for ATTACHED_TTL_S (they died; Serve replaces them)."""
        live = self._live_routers(ATTACHED_TTL_S)
        with self._stats_lock:
            self.attached &= set(live)
            return set(self.attached)

    def _live_routers(self, ttl_s: float = ROUTER_TTL_S) -> dict[str, int]:
        now = time.monotonic()
        with self._stats_lock:
            return {r: v for r, (v, seen) in self.routers.items() if now - seen < ttl_s}

    def _routers_now(self) -> list[dict]:
        live = self._live_routers()
        with self._stats_lock:
            return [info for router, info in sorted(self.router_info.items()) if router in live]

    def _table(self) -> RoutingTable:
        return RoutingTable.from_plan(self.version, self.plan, self.slots.live_addresses(), self.shape)

    def _worker_slots(self) -> list[WorkerSlot]:
        memory = self.config.worker_memory_gb * 2**30 if self.config.worker_memory_gb else math.inf
        return [WorkerSlot(node=node, memory_bytes=memory) for node in self.slots.nodes()]

    def _replica_budget(self) -> int:
        budget = self.config.rebalance.max_total_replicas or math.ceil(1.5 * len(self.counts))
        if self.config.worker_memory_gb:
            budget = min(budget, int(len(self.plan) * self.config.worker_memory_gb * 2**30 // self.expert_bytes))
        return budget

    def _watch(self) -> None:
        last_rebalance = time.monotonic()
        while True:
            time.sleep(1.0)
            try:
                if self.freed:
                    continue
                self._heal()
                cfg = self.config.rebalance
                if cfg.enabled and time.monotonic() - last_rebalance >= cfg.interval_s:
                    last_rebalance = time.monotonic()
                    self.rebalance()
            except Exception:
                log.exception("controller watch step failed")

    def _heal(self) -> None:
        died, silent = self.slots.check()
        dead = died + self._silent_to_routers(silent)
        if dead:
            with self._lock:
                log.warning("expert workers %s are gone; routing around them and replacing them", dead)
                self.slots.forget(dead)
                self._publish()  # routers stop sending to the dead workers at once
        vacant = self.slots.vacant()
        if vacant and time.monotonic() >= self._replace_at:
            with self._lock:
                self._replace(vacant)

    def _silent_to_routers(self, silent: list[int]) -> list[int]:
        confirmed = silent_to_routers(silent, [r["ejected"] for r in self._routers_now()])
        if len(confirmed) < len(silent):
            log.warning("expert workers %s miss this controller's pings but not the routers' calls: kept",
                        sorted(set(silent) - set(confirmed)))
        return confirmed

    def _replace(self, slots: list[int]) -> None:
        failed = self.slots.replace(slots, self.plan)
        self.counters["replacements"] += len(slots) - len(failed)
        if failed:
            self.counters["replacement_failures"] += len(failed)
            self._replace_failures += 1
            first, longest = REPLACE_BACKOFF_S
            wait = min(first * 2 ** (self._replace_failures - 1), longest)
            self._replace_at, self.replace_error = time.monotonic() + wait, "; ".join(
                f"worker {slot}: {why}" for slot, why in sorted(failed.items()))
            log.error("could not replace expert workers (next try in %.0fs): %s", wait, self.replace_error)
        else:
            self._replace_failures, self.replace_error = 0, ""
        if len(failed) < len(slots):
            self._publish()

    def _status(self) -> dict:
        with self._stats_lock:
            tokens, worker_rows, counters = self.window.totals(), dict(self.worker_rows), dict(self.counters)
        stats, routers = self.slots.stats(), self._routers_now()
        per_pair = {pair: float(tokens.get(expert_key(*pair), 0)) for pair in self.counts}
        return {
            "app": self.app,
            "scope": self.scope,
            "started_at": self.started_at,
            "version": self.version,
            "routing_policy": self.config.routing.policy,
            "placement": "by_layer" if self.slots.by_layer else "spread",
            "controller_node_id": ray.get_runtime_context().get_node_id(),
            "controller_pid": os.getpid(),
            "nodes": [{"node_id": n["NodeID"], "address": n["NodeManagerAddress"], "alive": n["Alive"]}
                      for n in ray.nodes()],
            "workers": [
                {"worker": w, **stats.get(w, {"alive": False}), "replicas": [expert_key(*pair) for pair in sorted(pairs)],
                 "tokens_since_plan": worker_rows.get(w, 0)}
                for w, pairs in enumerate(self.plan)
            ],
            "replica_counts": {expert_key(*pair): n for pair, n in sorted(self.counts.items())},
            "tokens_per_expert": {expert_key(*pair): int(t) for pair, t in sorted(per_pair.items()) if t},
            "window_s": self.config.rebalance.window_s,
            "projected_worker_tokens": worker_loads(self.plan, self.counts, per_pair),
            "layer_timings": self.layer_timings,
            "layer_timings_ms": per_call_ms(self.layer_timings),
            "health": {name: counters.get(name, 0) for name in HEALTH_COUNTERS},
            "replacement_error": self.replace_error,
            "routers": routers,
            "ejected_workers": sorted({w for r in routers for w in r["ejected"]}),
        }


def silent_to_routers(silent: list[int], ejected_by_router: list[list[int]]) -> list[int]:
    """Of the workers silent to the controller, those that every live router keeps ejected too. A controller cut off
    from the network finds every worker silent and hears from no router: it must not take down workers that serve."""
    return [w for w in silent if ejected_by_router and all(w in ejected for ejected in ejected_by_router)]


def _pairs(spec: dict[str, int]) -> dict[tuple[int, int], int]:
    pairs = {}
    for key, n in spec.items():
        try:
            pair = parse_expert_key(key)
        except ValueError as error:
            raise PlanError(str(error)) from None
        if int(n) < 1:
            raise PlanError(f"expert {key} must keep at least 1 replica, got {n}")
        pairs[pair] = int(n)
    return pairs



def controller_actor(version: dict) -> DeploymentActorConfig:
    """The controller as a deployment-scoped actor of the serving deployment (see the module's docstring)."""
    return DeploymentActorConfig(
        name=CONTROLLER, actor_class=ray.remote(ExpertController), init_args=(version,),
        actor_options={"num_cpus": 0, "max_concurrency": 16},
    )
