"""Placement and rebalancing plans on their own: no Ray."""

import random

import pytest

from cluster.control.placement import (
    PlanError,
    WorkerSlot,
    expert_owner,
    packs_layers,
    plan_placement,
    rebalance_counts,
    replica_counts,
    worker_loads,
)

SHAPE = {1: 8, 2: 8, 3: 8}
MIB = 2**20


def slots(n, nodes=None, memory=float("inf")):
    return [WorkerSlot(node=f"n{i % (nodes or n)}", memory_bytes=memory) for i in range(n)]


def check_plan(plan, counts, workers, expert_bytes):
    owners = expert_owner(plan)
    assert {p: len(w) for p, w in owners.items()} == counts  # every expert, its exact replica count
    assert all(len(set(pairs)) == len(pairs) for pairs in plan)  # no two replicas of one expert on a worker
    assert all(len(pairs) * expert_bytes <= w.memory_bytes for pairs, w in zip(plan, workers))
    return owners


def test_every_expert_placed_once_and_layers_spread_over_workers():
    counts = replica_counts(SHAPE, {})
    plan = plan_placement(counts, slots(3), expert_bytes=MIB)
    check_plan(plan, counts, slots(3), MIB)
    assert max(map(len, plan)) - min(map(len, plan)) <= 1


def test_by_layer_packs_each_layer_onto_as_few_workers_as_balance_allows():
    shape = {0: 8, 1: 8, 2: 8, 3: 8}
    counts = replica_counts(shape, {})
    spread = plan_placement(counts, slots(4), expert_bytes=MIB)
    packed = plan_placement(counts, slots(4), expert_bytes=MIB, by_layer=True)
    check_plan(packed, counts, slots(4), MIB)
    assert all(len({layer for layer, _ in pairs}) == 4 for pairs in spread)  # every layer on every worker
    assert sorted({layer for layer, _ in pairs} for pairs in packed) == [{0}, {1}, {2}, {3}]
    hot = replica_counts(shape, {(2, 3): 2})
    tokens = {pair: 9.0 if pair == (2, 3) else 1.0 for pair in hot}
    packed = plan_placement(hot, slots(4), MIB, load=tokens, by_layer=True)
    check_plan(packed, hot, slots(4), MIB)
    loads = worker_loads(packed, hot, tokens)
    assert max(loads) - min(loads) <= 4.5  # within one replica's share of even
    assert sum(len({layer for layer, _ in pairs}) for pairs in packed) <= 8  # spread: 16 (layer, worker) calls


def test_auto_packs_layers_only_where_workers_share_a_node():
    assert packs_layers("auto", ["a", "a", "b"]) and packs_layers("by_layer", ["a", "b"])
    assert not packs_layers("auto", ["a", "b", "c"]) and not packs_layers("spread", ["a", "a"])


def test_replicas_of_one_expert_go_to_different_nodes_where_possible():
    counts = replica_counts(SHAPE, {(1, 0): 3, (2, 5): 2})
    workers = slots(6, nodes=3)  # two workers per node
    owners = check_plan(plan_placement(counts, workers, MIB), counts, workers, MIB)
    assert len({workers[w].node for w in owners[1, 0]}) == 3
    assert len({workers[w].node for w in owners[2, 5]}) == 2


def test_memory_budget_is_respected_and_a_shortfall_is_named():
    counts = replica_counts(SHAPE, {}, default=2)  # 48 replicas
    workers = slots(4, memory=12 * MIB)
    check_plan(plan_placement(counts, workers, MIB), counts, workers, MIB)
    with pytest.raises(PlanError, match=r"need 0.05 GiB .* short by"):
        plan_placement(counts, slots(4, memory=11 * MIB), MIB)
    with pytest.raises(PlanError, match="wants 5 replicas but there are only 4 workers"):
        plan_placement(replica_counts(SHAPE, {(1, 1): 5}), slots(4), MIB)


def test_unknown_expert_and_previous_placement_is_kept():
    with pytest.raises(PlanError, match="9:0 is not a routed expert"):
        replica_counts(SHAPE, {(9, 0): 2})
    before = plan_placement(replica_counts(SHAPE, {}), slots(3), MIB)
    after = plan_placement(replica_counts(SHAPE, {(2, 3): 3}), slots(3), MIB, previous=before)
    assert all(set(b) <= set(a) for b, a in zip(before, after))
    assert sum(map(len, after)) == sum(map(len, before)) + 2


def test_rebalance_gives_hot_experts_replicas_and_lowers_worker_max_over_mean():
    tokens = {p: 1.0 for p in replica_counts(SHAPE, {})}
    tokens[1, 0], tokens[1, 1] = 400.0, 200.0
    counts = rebalance_counts(tokens, budget=30, max_per_pair=4)
    assert all(n >= 1 for n in counts.values()) and sum(counts.values()) <= 30
    assert counts[1, 0] == 4 and counts[1, 1] >= 2
    workers = slots(4)
    before = worker_loads(plan_placement(replica_counts(SHAPE, {}), workers, MIB), replica_counts(SHAPE, {}), tokens)
    plan = plan_placement(counts, workers, MIB, load=tokens)
    check_plan(plan, counts, workers, MIB)
    after = worker_loads(plan, counts, tokens)
    assert max(after) / (sum(after) / 4) < max(before) / (sum(before) / 4)


def test_rebalance_budget_below_one_each_is_refused():
    with pytest.raises(PlanError, match="cannot keep one of each"):
        rebalance_counts({(0, 0): 1.0, (0, 1): 1.0}, budget=1, max_per_pair=2)


def reference_placement(counts, workers, expert_bytes, load=None, previous=None, by_layer=False):
    """plan_placement as first written: every choice rescans the whole plan."""
    plan, loads = [[] for _ in workers], [0.0] * len(workers)
    share = {p: (load or {}).get(p, 1.0) / n for p, n in counts.items()}
    todo = dict(counts)
    for w, pairs in enumerate(previous or []):
        for pair in pairs:
            if todo.get(pair, 0) > 0 and w < len(workers):
                plan[w].append(pair)
                loads[w] += share[pair]
                todo[pair] -= 1
    fair_load = sum(share[p] * n for p, n in counts.items()) / len(workers) if by_layer else 0.0
    for pair in sorted(todo, key=lambda p: (-share[p], p)):
        for _ in range(todo[pair]):
            used_nodes = {workers[w].node for w, pairs in enumerate(plan) if pair in pairs}
            fits = [w for w in range(len(workers))
                    if pair not in plan[w] and (len(plan[w]) + 1) * expert_bytes <= workers[w].memory_bytes]
            packs = [any(p[0] == pair[0] for p in plan[w]) and loads[w] + share[pair] <= fair_load + 1e-9
                     for w in range(len(workers))]
            w = min(fits, key=lambda w: (workers[w].node in used_nodes, not packs[w], loads[w], len(plan[w]), w))
            plan[w].append(pair)
            loads[w] += share[pair]
    return plan


@pytest.mark.parametrize("seed", range(30))
def test_placement_equals_the_reference(seed):
    rng = random.Random(seed)
    shape = {layer: rng.randint(2, 12) for layer in range(rng.randint(1, 4))}
    workers = slots(rng.randint(2, 6), nodes=rng.randint(1, 6), memory=rng.choice([float("inf"), 40 * MIB]))
    counts = {p: rng.randint(1, min(3, len(workers))) for p in replica_counts(shape, {})}
    load = {p: float(rng.randint(0, 100)) for p in counts} if rng.random() < 0.7 else None
    by_layer = rng.random() < 0.5
    try:
        previous = plan_placement(replica_counts(shape, {}), workers, MIB, by_layer=by_layer)
        expected = reference_placement(counts, workers, MIB, load, previous, by_layer)
    except (PlanError, ValueError):  # does not fit: the reference has no messages of its own
        return
    assert plan_placement(counts, workers, MIB, load, previous, by_layer) == expected


def test_deepseek_v3_sized_plans_place_and_rebalance():
    """58 MoE layers of 256 experts (14,848 pairs) on 32 workers, then a rebalance to 1.5 replicas each."""
    shape = {layer: 256 for layer in range(3, 61)}
    workers = slots(32, nodes=16)
    counts = replica_counts(shape, {})
    plan = plan_placement(counts, workers, MIB)
    check_plan(plan, counts, workers, MIB)
    rng = random.Random(0)
    tokens = {pair: rng.paretovariate(1.2) for pair in counts}
    more = rebalance_counts(tokens, len(counts) * 3 // 2, len(workers))
    replanned = plan_placement(more, workers, MIB, load=tokens, previous=plan)
    check_plan(replanned, more, workers, MIB)
    loads = worker_loads(replanned, more, tokens)
    assert max(loads) / (sum(loads) / len(loads)) < 1.05
