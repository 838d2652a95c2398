"""Spreading one layer's token-expert pairs over each expert's replicas by least outstanding work. Pure torch.

T = tokens, K = experts per token, S = T * K pairs, E = experts
"""

import torch

MIN_SPLIT = 16  # fewer rows than this per replica cost more in calls than they save in compute


class NoReplica(LookupError):
    def __init__(self, layer: int, expert: int, why: str = ""):
        super().__init__(f"layer {layer} expert {expert} has no live replica" + (f" ({why})" if why else ""))
        self.layer, self.expert = layer, expert


def assign_workers(
    layer: int, top_k_index: torch.Tensor, replicas: list[list[int]], outstanding: dict[int, int], turn: int = 0,
) -> torch.Tensor:
    """[T, K] worker of each pair: every expert's rows go, in near-equal chunks, to its least-loaded replicas.

    replicas: per expert, the workers hosting it; outstanding: rows in flight per worker before this call;
    turn: rotates ties between equally loaded replicas from call to call. Heavier experts choose first,
    and each chunk adds to its worker's load for the experts after it.
    """
    if all(len(hosts) == 1 for hosts in replicas):  # one live replica each: nothing to balance
        return torch.tensor([hosts[0] for hosts in replicas])[top_k_index]
    flat = top_k_index.reshape(-1)  # [S]
    order = torch.argsort(flat, stable=True)  # [S] pairs grouped by expert
    counts = torch.bincount(flat, minlength=len(replicas)).tolist()  # [E]
    starts = [sum(counts[:e]) for e in range(len(counts))]
    pair_worker = torch.empty_like(flat)  # [S]
    load = dict(outstanding)
    for expert in sorted((e for e, n in enumerate(counts) if n), key=lambda e: -counts[e]):
        hosts = replicas[expert]
        if not hosts:
            raise NoReplica(layer, expert)
        rows = order[starts[expert] : starts[expert] + counts[expert]]
        parts = max(1, min(len(hosts), len(rows) // MIN_SPLIT))
        chosen = sorted(hosts, key=lambda w: (load.get(w, 0), (w - turn) % (max(hosts) + 1)))[:parts]
        bounds = [len(rows) * i // parts for i in range(parts + 1)]
        for worker, a, b in zip(chosen, bounds, bounds[1:]):
            pair_worker[rows[a:b]] = worker
            load[worker] = load.get(worker, 0) + b - a
    return pair_worker.view_as(top_k_index)
