"""Placement and rebalancing plans: which worker hosts which expert replica. Pure Python, no Ray.

A plan is a list, per worker, of the (layer, expert) pairs it hosts; a pair appears at most once per worker.
"""

import heapq
import math
from dataclasses import dataclass

Pair = tuple[int, int]
Plan = list[list[Pair]]


class PlanError(ValueError):
    """The replicas do not fit the workers; the message names the shortfall."""


@dataclass(frozen=True)
class WorkerSlot:
    node: str
    memory_bytes: float = math.inf


def replica_counts(moe_shape: dict[int, int], overrides: dict[Pair, int], default: int = 1) -> dict[Pair, int]:
    """Every (layer, expert) of the model with its replica count; unknown pairs in `overrides` are refused."""
    counts = {(layer, e): default for layer, n in moe_shape.items() for e in range(n)}
    unknown = sorted(set(overrides) - set(counts))
    if unknown:
        raise PlanError(f"expert {unknown[0][0]}:{unknown[0][1]} is not a routed expert of this model")
    counts.update(overrides)
    return counts


def plan_placement(
    counts: dict[Pair, int], workers: list[WorkerSlot], expert_bytes: float,
    load: dict[Pair, float] | None = None, previous: Plan | None = None, by_layer: bool = False,
) -> Plan:
    """Place `counts[pair]` replicas of every pair, each on a different worker (and node, where possible).

    Replicas carry load[pair] / counts[pair] (tokens, or 1 without stats) and go, heaviest first, to the
    worker with the least load that has memory left. With `previous`, replicas already placed stay put.
    `by_layer` packs each layer's replicas onto as few workers as an even load allows, so an MoE layer
    calls fewer workers; otherwise each layer spreads over every worker and computes on all of them at once.
    """
    _check_fits(counts, workers, expert_bytes)
    placing = _Placing(workers, expert_bytes)
    share = {p: (load or {}).get(p, 1.0) / n for p, n in counts.items()}
    todo = dict(counts)
    for w, pairs in enumerate(previous or []):
        for pair in pairs:
            if todo.get(pair, 0) > 0 and w < len(workers):
                placing.put(w, pair, share[pair])
                todo[pair] -= 1
    fair_load = sum(share[p] * n for p, n in counts.items()) / len(workers) if by_layer else 0.0
    for pair in sorted(todo, key=lambda p: (-share[p], p)):
        for _ in range(todo[pair]):
            placing.put(placing.best_worker(pair, share[pair], fair_load), pair, share[pair])
    return placing.plan


class _Placing:
    """A plan being built, with what choosing a worker asks of it kept at hand: each choice costs one pass over the
    workers, however many pairs the plan holds (DeepSeek-V3 has 14,848)."""

    def __init__(self, workers: list[WorkerSlot], expert_bytes: float):
        self.workers, self.expert_bytes = workers, expert_bytes
        self.plan: Plan = [[] for _ in workers]
        self.hosted: list[set[Pair]] = [set() for _ in workers]
        self.layers: list[set[int]] = [set() for _ in workers]
        self.loads = [0.0] * len(workers)
        self.nodes_of: dict[Pair, set[str]] = {}  # nodes that host a replica of the pair

    def put(self, w: int, pair: Pair, share: float) -> None:
        self.plan[w].append(pair)
        self.hosted[w].add(pair)
        self.layers[w].add(pair[0])
        self.loads[w] += share
        self.nodes_of.setdefault(pair, set()).add(self.workers[w].node)

    def best_worker(self, pair: Pair, share: float, fair_load: float) -> int:
        """The least-loaded worker with room and no replica of `pair`, on a node without one where possible,
        preferring one where the pair packs (joins its layer there within `fair_load`)."""
        fits = [w for w, slot in enumerate(self.workers)
                if pair not in self.hosted[w] and (len(self.plan[w]) + 1) * self.expert_bytes <= slot.memory_bytes]
        if not fits:
            raise PlanError(f"no worker has room for another replica of expert {pair[0]}:{pair[1]} "
                            f"({self.expert_bytes / 2**20:.1f} MiB)")
        used_nodes = self.nodes_of.get(pair, set())

        def rank(w: int) -> tuple:
            packs = pair[0] in self.layers[w] and self.loads[w] + share <= fair_load + 1e-9
            return self.workers[w].node in used_nodes, not packs, self.loads[w], len(self.plan[w]), w

        return min(fits, key=rank)


def packs_layers(placement: str, nodes: list[str]) -> bool:
    """Whether to place `by_layer`. auto does where workers share a node: on shared cores, waking every worker
    for each layer costs more than their parallel compute saves."""
    return placement == "by_layer" or (placement == "auto" and len(set(nodes)) < len(nodes))


def _check_fits(counts: dict[Pair, int], workers: list[WorkerSlot], expert_bytes: float) -> None:
    if not workers:
        raise PlanError("no workers to place experts on")
    widest = max(counts.values(), default=0)
    if widest > len(workers):
        pair = max(counts, key=counts.get)
        raise PlanError(f"expert {pair[0]}:{pair[1]} wants {widest} replicas but there are only {len(workers)} workers")
    need = sum(counts.values()) * expert_bytes
    have = sum(min(w.memory_bytes, 1e30) for w in workers)
    if need > have:
        raise PlanError(
            f"{sum(counts.values())} expert replicas need {need / 2**30:.2f} GiB but the {len(workers)} workers "
            f"have {have / 2**30:.2f} GiB: short by {(need - have) / 2**30:.2f} GiB"
        )


def rebalance_counts(tokens: dict[Pair, float], budget: int, max_per_pair: int) -> dict[Pair, int]:
    """Replica counts within `budget` total replicas: every pair keeps one, the hottest get the rest.

    In the spirit of DeepSeek's EPLB: each extra replica goes to the pair with the most tokens per replica,
    up to `max_per_pair` (the number of workers: two replicas of one expert never share a worker).
    """
    if budget < len(tokens):
        raise PlanError(f"a budget of {budget} replicas cannot keep one of each of the {len(tokens)} experts")
    counts = {pair: 1 for pair in tokens}
    heap = [(-t, pair) for pair, t in tokens.items() if t > 0 and max_per_pair > 1]
    heapq.heapify(heap)
    for _ in range(budget - len(tokens)):
        if not heap:
            break
        _, pair = heapq.heappop(heap)
        counts[pair] += 1
        if counts[pair] < max_per_pair:
            heapq.heappush(heap, (-tokens[pair] / counts[pair], pair))
    return counts


def worker_loads(plan: Plan, counts: dict[Pair, int], tokens: dict[Pair, float]) -> list[float]:
    """Tokens each worker is expected to serve when every expert splits its tokens evenly over its replicas."""
    return [sum(tokens.get(p, 0.0) / counts[p] for p in pairs) for pairs in plan]


def expert_owner(plan: Plan) -> dict[Pair, list[int]]:
    """{pair: [workers hosting a replica]}."""
    owners: dict[Pair, list[int]] = {}
    for worker, pairs in enumerate(plan):
        for pair in pairs:
            owners.setdefault(pair, []).append(worker)
    return owners
