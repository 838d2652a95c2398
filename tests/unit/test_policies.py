"""Serve-time routing policies and per-batch expert capacity."""

import itertools
import math
import subprocess
import sys

import pytest
import torch

from router.policies import (
    _lloyd_step,
    apply_capacity,
    balanced_route,
    capacity_for,
    fit_kmeans,
    hash_route,
    kmeans_route,
)


def distinct_per_token(index):
    return all(len(set(row)) == len(row) for row in index.tolist())


# --- hash ---


def test_hash_route_is_deterministic_distinct_and_weighted_uniformly():
    token_ids = torch.arange(500)
    index, weights = hash_route(token_ids, 16, 3, seed=7)
    again, _ = hash_route(token_ids.flip(0), 16, 3, seed=7)
    assert torch.equal(index, again.flip(0))  # a token's experts depend on its id alone
    assert distinct_per_token(index)
    assert torch.equal(weights, torch.full((500, 3), 1 / 3))
    assert not torch.equal(index, hash_route(token_ids, 16, 3, seed=8)[0])


def test_hash_route_is_stable_across_processes():
    code = (
        "import torch; from router.policies import hash_route;"
        "print(hash_route(torch.arange(0, 3000, 7), 64, 2, seed=123)[0].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == hash_route(torch.arange(0, 3000, 7), 64, 2, seed=123)[0].tolist()


def test_hash_route_spreads_a_vocabulary_evenly():
    experts, top_k, tokens = 32, 2, 64_000
    index, _ = hash_route(torch.arange(tokens), experts, top_k, seed=0)
    counts = torch.bincount(index.reshape(-1), minlength=experts).double()
    expected = tokens * top_k / experts  # 4000; binomial sd about 62
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)


def test_hash_route_handles_any_int64_token_id():
    index, _ = hash_route(torch.tensor([-1, 0, 2**40 + 5, 2**62]), 8, 8)
    assert all(sorted(row) == list(range(8)) for row in index.tolist())


# --- balanced ---


def brute_force_best(affinity, top_k, capacity):
    tokens, experts = affinity.shape
    best = -math.inf
    for choice in itertools.product(itertools.combinations(range(experts), top_k), repeat=tokens):
        load = torch.bincount(torch.tensor(choice).reshape(-1), minlength=experts)
        if load.max() <= capacity:
            best = max(best, sum(affinity[t, list(c)].sum().item() for t, c in enumerate(choice)))
    return best


def objective(affinity, index):
    return affinity.gather(1, index).sum().item()


CASES = [(tokens, 3, top_k, seed) for tokens in (4, 5) for top_k in (1, 2) for seed in range(3)]


@pytest.mark.parametrize("tokens,experts,top_k,seed", CASES + [(5, 4, 2, 0), (4, 4, 3, 1)])
def test_balanced_route_reaches_the_brute_force_optimum(tokens, experts, top_k, seed):
    generator = torch.Generator().manual_seed(seed)
    affinity = torch.randn(tokens, experts, generator=generator, dtype=torch.float64)
    affinity[:, 0] += 2.0  # every token prefers expert 0, so capacity binds
    index, weights = balanced_route(affinity, top_k)
    capacity = math.ceil(tokens * top_k / experts)
    assert torch.bincount(index.reshape(-1), minlength=experts).max() <= capacity
    assert distinct_per_token(index)
    assert objective(affinity, index) == pytest.approx(brute_force_best(affinity, top_k, capacity), abs=1e-12)
    torch.testing.assert_close(weights.sum(1), torch.ones(tokens, dtype=torch.float64))


def test_balanced_route_is_optimal_with_ties_and_loose_capacity():
    generator = torch.Generator().manual_seed(5)
    for _ in range(10):
        affinity = torch.randint(0, 3, (5, 3), generator=generator).double()  # many ties
        index, _ = balanced_route(affinity, 2, capacity=4)
        assert objective(affinity, index) == brute_force_best(affinity, 2, 4)


def no_improving_cycle(affinity, index, capacity):
    """Optimality certificate: no cycle of token moves (through experts with room) gains affinity."""
    tokens, experts = affinity.shape
    held = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, index, True)
    load = held.sum(0)
    slack = experts  # a node that absorbs a unit into any expert with room and emits one from any used expert
    cost = torch.full((experts + 1, experts + 1), math.inf, dtype=torch.float64)
    for a, b in itertools.permutations(range(experts), 2):
        movers = held[:, a] & ~held[:, b]
        if movers.any():
            cost[a, b] = (affinity[movers, a] - affinity[movers, b]).min()
    cost[:experts, slack][load < capacity] = 0.0
    cost[slack, :experts][load > 0] = 0.0
    for k in range(experts + 1):  # Floyd-Warshall
        cost = torch.minimum(cost, cost[:, k : k + 1] + cost[k : k + 1, :])
    return bool((cost.diagonal() >= -1e-9).all())


def test_balanced_route_certifies_optimal_on_larger_batches():
    generator = torch.Generator().manual_seed(11)
    affinity = torch.randn(300, 12, generator=generator, dtype=torch.float64) + torch.linspace(3, 0, 12)
    for top_k in (1, 2, 4):
        index, _ = balanced_route(affinity, top_k)
        capacity = math.ceil(300 * top_k / 12)
        assert torch.bincount(index.reshape(-1), minlength=12).max() <= capacity
        assert distinct_per_token(index)
        assert no_improving_cycle(affinity, index, capacity)
        greedy = apply_capacity(torch.topk(affinity, top_k).indices, affinity, capacity)[0]
        assert objective(affinity, index) >= objective(affinity, greedy)


def test_balanced_route_keeps_plain_top_k_when_it_fits_and_rejects_impossible_capacity():
    affinity = torch.eye(4)
    index, _ = balanced_route(affinity, 1)
    assert index.squeeze(1).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="do not fit"):
        balanced_route(torch.randn(9, 4), 2, capacity=4)


# --- k-means ---


def blobs(per_cluster=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0], [-10.0, -10.0, -10.0]])
    points = centers.repeat_interleave(per_cluster, 0) + torch.randn(4 * per_cluster, 3, generator=generator)
    return centers, points, torch.arange(4).repeat_interleave(per_cluster)


def test_kmeans_recovers_well_separated_clusters_deterministically():
    centers, points, labels = blobs()
    centroids = fit_kmeans(points, 4, seed=3)
    assert torch.equal(centroids, fit_kmeans(points, 4, seed=3))
    match = torch.cdist(centers, centroids).argmin(1)  # blob -> its centroid
    assert sorted(match.tolist()) == [0, 1, 2, 3]
    assert (torch.cdist(centers, centroids).min(1).values < 0.5).all()
    index, weights = kmeans_route(points, centroids, 2)
    assert torch.equal(index[:, 0], match[labels])
    assert distinct_per_token(index)
    assert torch.equal(weights, torch.full((200, 2), 0.5))


def test_an_empty_cluster_restarts_at_the_worst_fitting_point():
    centers, points, _ = blobs()
    stray = torch.tensor([[1000.0, 1000.0, 1000.0]])  # wins no point
    updated = _lloyd_step(points, torch.cat([centers[:3], stray]))
    assert any(torch.equal(updated[3], point) for point in points[150:])  # the far blob's points fit worst
    assert sorted(torch.cdist(centers, fit_kmeans(points, 4, iters=1, seed=0)).argmin(1).tolist()) == [0, 1, 2, 3]


def test_fit_kmeans_with_fewer_distinct_points_than_clusters():
    centroids = fit_kmeans(torch.cat([torch.zeros(20, 2), torch.full((3, 2), 5.0)]), 4, iters=10, seed=0)
    assert centroids.shape == (4, 2) and centroids.isfinite().all()
    assert {tuple(c) for c in centroids.tolist()} == {(0.0, 0.0), (5.0, 5.0)}


# --- capacity ---


def test_capacity_for():
    assert capacity_for(10, 2, 8, 1.0) == 3
    assert capacity_for(10, 1, 11, 1.1) == 1
    assert capacity_for(64, 2, 8, 1.25) == 20


def test_apply_capacity_reroutes_overflow_to_the_next_best_expert_with_room():
    scores = torch.tensor(
        [
            [0.9, 0.5, 0.1, 0.0],
            [0.8, 0.1, 0.6, 0.0],
            [0.7, 0.6, 0.5, 0.4],
        ]
    )
    index = torch.tensor([[0], [0], [0]])
    capped, keep = apply_capacity(index, scores, capacity=1)
    # token 0 (0.9) keeps expert 0; token 1 (0.8) goes to its next best, 2; token 2 to 1, its best with room.
    assert capped.squeeze(1).tolist() == [0, 2, 1]
    assert keep.all()


def test_apply_capacity_drop_marks_overflow_and_keeps_the_highest_scores():
    scores = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    index = torch.tensor([[0], [0], [0]])
    capped, keep = apply_capacity(index, scores, capacity=1, overflow="drop")
    assert torch.equal(capped, index)
    assert keep.squeeze(1).tolist() == [False, True, False]


def test_apply_capacity_never_exceeds_capacity_nor_repeats_an_expert():
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(200, 8, generator=generator) + torch.linspace(2, 0, 8)
    index = torch.topk(scores, 2).indices
    capacity = capacity_for(200, 2, 8, 1.0)
    for overflow in ("reroute", "drop"):
        capped, keep = apply_capacity(index, scores, capacity, overflow)
        assert torch.bincount(capped[keep], minlength=8).max() <= capacity
        assert distinct_per_token(capped)
    dropped = index.numel() - int(keep.sum())
    rerouted, rerouted_keep = apply_capacity(index, scores, capacity, "reroute")
    assert index.numel() - int(rerouted_keep.sum()) < dropped
    assert torch.equal(rerouted, apply_capacity(index, scores, capacity, "reroute")[0])
    assert apply_capacity(index, scores, capacity_for(200, 2, 8, 1.25), "reroute")[1].all()


def test_apply_capacity_reroute_drops_when_no_expert_has_room():
    index, keep = apply_capacity(torch.tensor([[0, 1], [0, 1]]), torch.zeros(2, 3), capacity=1)
    assert index.tolist() == [[0, 1], [2, 1]]
    assert keep.tolist() == [[True, True], [True, False]]


# --- reports and parameters ---


def test_an_unknown_overflow_names_the_valid_choices():
    with pytest.raises(ValueError, match="one of reroute, drop"):
        apply_capacity(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 2), 1, "spill")
