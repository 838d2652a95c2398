"""Serve-time routing policies other than the checkpoint's own gate, and per-batch expert capacity. Pure torch.

T = tokens, E = experts, K = experts per token, D = hidden, N = fitting samples, W = workers

Every policy returns (index [T, K] int64, weights [T, K]); each token's K experts are distinct.
"""

import math

import numpy as np
import torch

POLICIES = ("model", "hash", "balanced", "kmeans")
OVERFLOW = ("reroute", "drop")
_MASK32 = 0xFFFFFFFF


def uniform_weights(index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[T, K] -> [T, K] all 1/K: policies with no learned gate weigh a token's experts equally."""
    return torch.full(index.shape, 1.0 / index.shape[1], dtype=dtype, device=index.device)


# --- hash ---------------------------------------------------------------------------------------------------


def hash_route(
    token_ids: torch.Tensor, num_experts: int, top_k: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash Layers (Roller et al. 2021): a fixed hash of the token id picks K distinct experts, weighted 1/K.

    token_ids: [T] -> index [T, K], weights [T, K]. Each (seed, token, expert) gets a 32-bit hash; a token takes
    the K experts with the largest, so any token's experts are a uniform random K-subset and a vocabulary spreads
    evenly. Stable across processes, restarts and devices: integer mixing only, never Python's salted `hash()`.
    """
    _check_top_k(top_k, num_experts)
    salt = _mix32(torch.tensor(seed & _MASK32, device=token_ids.device))
    token = _mix32((token_ids.long() & _MASK32) ^ salt)  # [T]
    experts = torch.arange(num_experts, device=token_ids.device)  # [E]
    keys = _mix32(token[:, None] ^ _mix32((experts + 0x9E3779B9) & _MASK32))  # [T, E]
    index = torch.topk(keys * num_experts + experts, top_k, dim=-1).indices  # [T, K], unique keys: no ties
    return index, uniform_weights(index)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values below 2**32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # x * c mod 2**32 in 16-bit halves of c: no int64 product overflows, whose result torch leaves undefined.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


# --- balanced (BASE layers) -----------------------------------------------------------------------------------


def balanced_route(
    affinity: torch.Tensor, top_k: int, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BASE layers (Lewis et al. 2021): K distinct experts per token, at most `capacity` tokens per expert,
    maximising the total affinity of the chosen pairs. Exact, for every K.

    affinity: [T, E] (e.g. router logits) -> index [T, K] (each token's experts by affinity, best first),
    weights [T, K] = softmax of the chosen affinities (for router logits: the gate's probabilities renormalised
    over the assigned experts). capacity defaults to ceil(T * K / E).

    Method: the problem is a transportation problem (token -> expert edges of capacity 1, each token supplies K,
    each expert takes at most `capacity`), solved as min-cost flow by successive shortest paths: tokens join one
    at a time, each of their K units takes a shortest augmenting path over the experts (Dijkstra with expert
    prices as potentials; a path bumps tokens from full experts to their next choice). Optimal up to float64
    rounding. Cost O(T * K * E) when the plain top-K already fits, up to O(T**2 * K * E**2) under heavy contention.
    """
    tokens, num_experts = affinity.shape
    _check_top_k(top_k, num_experts)
    capacity = math.ceil(tokens * top_k / num_experts) if capacity is None else capacity
    if tokens * top_k > num_experts * capacity:
        raise ValueError(f"{tokens} tokens x {top_k} experts do not fit {num_experts} experts x {capacity} slots")
    assigned = _plain_top_k(affinity, top_k, capacity)
    if assigned is None:
        optimum = _min_cost_assignment(affinity.double().cpu().numpy(), top_k, capacity)
        assigned = torch.from_numpy(optimum).to(affinity.device)
    return _ranked(assigned, affinity, top_k)


def _plain_top_k(affinity: torch.Tensor, top_k: int, capacity: int) -> torch.Tensor | None:
    """[T, E] bool of each token's own top-K when no expert then exceeds capacity (already optimal), else None."""
    index = torch.topk(affinity, top_k, dim=-1).indices  # [T, K]
    assigned = torch.zeros_like(affinity, dtype=torch.bool).scatter_(1, index, True)  # [T, E]
    return assigned if int(assigned.sum(0).max()) <= capacity else None


def _ranked(assigned: torch.Tensor, affinity: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] bool with K per row -> index [T, K] by affinity, best first; weights [T, K] softmax over them."""
    chosen = affinity.masked_fill(~assigned, float("-inf"))  # [T, E]
    top, index = torch.topk(chosen, top_k, dim=-1)  # [T, K]
    return index, torch.softmax(top, dim=-1)


def _min_cost_assignment(affinity: np.ndarray, top_k: int, capacity: int) -> np.ndarray:
    """[T, E] float64 -> [T, E] bool: the exact optimum, by successive shortest augmenting paths."""
    state = _FlowState(affinity, capacity, _uncontested(affinity, top_k, capacity))
    for token in np.flatnonzero(~state.assigned.any(1)):
        for _ in range(top_k):
            state.augment(int(token))
    return state.assigned


def _uncontested(affinity: np.ndarray, top_k: int, capacity: int) -> np.ndarray:
    """[T, E] bool: the tokens, in order, whose whole top-K fits; holding their own best, they start optimal."""
    top = np.argsort(-affinity, axis=1, kind="stable")[:, :top_k]  # [T, K]
    first = np.zeros(affinity.shape, np.int64)  # [T, E]
    np.put_along_axis(first, top, 1, axis=1)
    fits = ((first.cumsum(0) <= capacity) | (first == 0)).all(1)  # [T]
    return (first > 0) & fits[:, None]


class _FlowState:
    """A partial assignment that is optimal for the tokens in it, with the expert prices that certify it.

    Invariants: every token holds its best experts by reduced affinity (affinity - price); only full experts
    have a positive price. A path step moving a token from expert a to b loses reduced affinity
    (aff[t, a] - aff[t, b]) - price[a] + price[b]; the cheapest token per (a, b) does not depend on prices, so
    those rows are cached until a's holders, or what they hold, change.
    """

    def __init__(self, affinity: np.ndarray, capacity: int, assigned: np.ndarray):
        self.affinity, self.capacity, self.assigned = affinity, capacity, assigned
        self.load = assigned.sum(0)  # [E]
        self.price = np.zeros(affinity.shape[1])  # [E]
        self.rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # expert -> (affinity lost [E], token [E])

    def augment(self, token: int) -> None:
        """Give `token` one more expert along a shortest path, then raise the prices of the experts it crossed."""
        dist, parent, mover, settled, end = self._shortest_path(token)
        self.price[settled] += np.maximum(dist[end] - dist[settled], 0.0)
        self.load[end] += 1
        expert, touched = end, [token]
        while parent[expert] >= 0:  # each full expert on the way hands one token on to the next
            self.assigned[mover[expert], parent[expert]] = False
            self.assigned[mover[expert], expert] = True
            touched.append(mover[expert])
            expert = parent[expert]
        self.assigned[token, expert] = True
        for stale in np.flatnonzero(self.assigned[touched].any(0)):  # holders, or what they hold, changed
            self.rows.pop(int(stale), None)

    def _shortest_path(self, token: int):
        """Dijkstra over experts from `token`'s next unit to the nearest expert with room; costs are the
        reduced-affinity losses, non-negative by the invariants."""
        num_experts = self.price.size
        reduced = self.affinity[token] - self.price  # [E]
        dist = np.where(self.assigned[token], np.inf, reduced[~self.assigned[token]].max() - reduced)  # [E]
        parent = np.full(num_experts, -1)
        mover = np.full(num_experts, -1)
        settled = np.zeros(num_experts, bool)
        while True:
            expert = int(np.argmin(np.where(settled, np.inf, dist)))
            if not np.isfinite(dist[expert]):
                raise RuntimeError("no augmenting path; capacity checks should have prevented this")
            settled[expert] = True
            if self.load[expert] < self.capacity:
                return dist, parent, mover, settled, expert
            lost, who = self._moves_out_of(expert, token)
            step = dist[expert] + lost - self.price[expert] + self.price  # [E]
            better = ~settled & (step < dist)  # [E]
            dist[better], parent[better], mover[better] = step[better], expert, who[better]

    def _moves_out_of(self, expert: int, source: int) -> tuple[np.ndarray, np.ndarray]:
        """Cheapest move of a token held by full `expert` to each other expert: affinity lost [E], token [E]."""
        if expert in self.rows:
            return self.rows[expert]
        holders = np.flatnonzero(self.assigned[:, expert])
        own = self.assigned[source, expert]  # the source is the path's start, never a step on it
        holders = holders[holders != source]  # [H]
        if holders.size == 0:
            return np.full(self.price.size, np.inf), np.full(self.price.size, -1)
        lost = np.where(self.assigned[holders], np.inf, self.affinity[holders, expert, None] - self.affinity[holders])
        best = lost.argmin(0)  # [E]
        row = lost[best, np.arange(lost.shape[1])], holders[best]  # [E], [E]
        if not own:
            self.rows[expert] = row
        return row


# --- k-means ----------------------------------------------------------------------------------------------------


def kmeans_route(hidden: torch.Tensor, centroids: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token to its K nearest centroids (one per expert), weighted 1/K.

    hidden: [T, D], centroids: [E, D] -> index [T, K] nearest first, weights [T, K].
    """
    _check_top_k(top_k, centroids.shape[0])
    index = torch.topk(_sq_distances(hidden, centroids), top_k, dim=-1, largest=False).indices  # [T, K]
    return index, uniform_weights(index, hidden.dtype)


def fit_kmeans(hidden: torch.Tensor, num_clusters: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """k-means++ seeding then Lloyd iterations; the same hidden and seed give the same centroids.

    hidden: [N, D] -> centroids [E, D], E = num_clusters. A cluster left empty restarts at the point farthest
    from its centroid, so every expert keeps some tokens.
    """
    if not 1 <= num_clusters <= hidden.shape[0]:
        raise ValueError(f"num_clusters must be between 1 and the {hidden.shape[0]} samples, got {num_clusters}")
    points = hidden.float().cpu()  # the seeded draws use a CPU generator
    centroids = _kmeans_plus_plus(points, num_clusters, torch.Generator().manual_seed(seed))
    for _ in range(iters):
        updated = _lloyd_step(points, centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids.to(hidden.device, hidden.dtype)


def _kmeans_plus_plus(points: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """[N, D] -> [E, D]: each next seed drawn with probability proportional to its squared distance."""
    chosen = [int(torch.randint(points.shape[0], (1,), generator=generator))]
    nearest = _sq_distances(points, points[chosen]).squeeze(1)  # [N]
    for _ in range(num_clusters - 1):
        if nearest.sum() > 0:
            chosen.append(int(torch.multinomial(nearest, 1, generator=generator)))
        else:  # fewer distinct points than clusters
            chosen.append(int(torch.randint(points.shape[0], (1,), generator=generator)))
        nearest = torch.minimum(nearest, _sq_distances(points, points[chosen[-1:]]).squeeze(1))
    return points[chosen].clone()


def _lloyd_step(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[N, D], [E, D] -> [E, D]: each centroid moves to the mean of its points."""
    distances = _sq_distances(points, centroids)  # [N, E]
    label = distances.argmin(dim=1)  # [N]
    sums = torch.zeros_like(centroids).index_add_(0, label, points)  # [E, D]
    counts = torch.bincount(label, minlength=centroids.shape[0])  # [E]
    updated = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)  # [E, D]
    return _reseed_empty(updated, counts, points, distances.gather(1, label[:, None]).squeeze(1))


def _reseed_empty(centroids, counts, points, own_distance) -> torch.Tensor:
    """Move each empty cluster onto the worst-fitting point not already used to reseed."""
    empty = (counts == 0).nonzero().squeeze(1).tolist()
    if not empty:
        return centroids
    farthest = torch.argsort(own_distance, descending=True, stable=True)[: len(empty)]  # [<= empty]
    centroids = centroids.clone()
    centroids[empty[: farthest.numel()]] = points[farthest]
    return centroids


def _sq_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[N, D], [E, D] -> [N, E] squared Euclidean distances."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ y.T + y.pow(2).sum(1)).clamp(min=0)


# --- capacity -----------------------------------------------------------------------------------------------------


def capacity_for(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * T * K / E): slots per expert per batch."""
    # Rounded first so that, e.g., 1.1 * 10 / 11 = 1.0000000000000002 gives 1, not 2.
    return math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9))


def apply_capacity(
    index: torch.Tensor, scores: torch.Tensor, capacity: int, overflow: str = "reroute"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cap each expert at `capacity` token-expert pairs per batch.

    index: [T, K], scores: [T, E] -> index [T, K], keep_mask [T, K]. Pairs claim slots by score, best first
    (batch-prioritised routing; ties by token, then slot). Pairs that find their expert full then go, in the same
    order, to the token's best-scoring expert that still has room and that the token does not already use
    ("reroute"), or are dropped: keep_mask False, expert id unchanged; the caller zeroes their weight so the
    token's residual passes through (or skips them, to also save the compute).
    """
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW)}, got {overflow!r}")
    order = _priority(index, scores)  # [S]
    keep = _first_come(index.reshape(-1)[order], scores.shape[1], capacity)  # [S] in priority order
    keep_mask = torch.empty_like(keep)
    keep_mask[order] = keep
    keep_mask = keep_mask.view(index.shape)  # [T, K]
    if overflow == "drop" or keep_mask.all():
        return index, keep_mask
    return _reroute(index, keep_mask, scores, order, capacity)


def _priority(index: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """[T, K] -> [S] flat pair order, highest score first, stable so ties keep token-then-slot order."""
    pair_scores = scores.gather(1, index).reshape(-1)  # [S]
    return torch.argsort(pair_scores, descending=True, stable=True)


def _first_come(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """[S] experts in priority order -> [S] bool: whether the pair is within its expert's first `capacity`."""
    by_expert = torch.argsort(experts, stable=True)  # [S] grouped by expert, priority order within
    counts = torch.bincount(experts, minlength=num_experts)  # [E]
    starts = counts.cumsum(0) - counts  # [E]
    sorted_position = torch.arange(experts.numel(), device=experts.device)  # [S]
    position = torch.empty_like(experts)
    position[by_expert] = sorted_position - starts[experts[by_expert]]  # [S] rank among its expert's pairs
    return position < capacity


def _reroute(index, keep_mask, scores, order, capacity) -> tuple[torch.Tensor, torch.Tensor]:
    """Send each overflowing pair, in priority order, to its token's best expert with room, else drop it."""
    index, keep_mask = index.clone(), keep_mask.clone()
    top_k = index.shape[1]
    load = torch.bincount(index[keep_mask], minlength=scores.shape[1])  # [E]
    for pair in order[~keep_mask.reshape(-1)[order]].tolist():
        token, slot = divmod(pair, top_k)
        open_ = load < capacity  # [E]
        open_[index[token]] = False
        if not open_.any():
            continue
        expert = int(scores[token].masked_fill(~open_, float("-inf")).argmax())
        index[token, slot], keep_mask[token, slot] = expert, True
        load[expert] += 1
    return index, keep_mask


# --- reports --------------------------------------------------------------------------------------------------------


def _check_top_k(top_k: int, num_experts: int) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and the {num_experts} experts, got {top_k}")
