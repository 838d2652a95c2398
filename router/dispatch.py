"""Grouping one MoE layer's tokens by worker and expert, and combining the experts' outputs. Pure torch.

T = tokens, K = experts per token, S = T * K token-expert pairs, E = experts, W = workers, D = hidden
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dispatch:
    order: torch.Tensor  # [S] pair index of each row sent, grouped by worker, then by expert
    workers: list[int]  # worker of each group, ascending
    experts: list[int]  # expert of each group
    counts: list[int]  # rows in each group

    def per_worker(self) -> list[tuple[int, list[int], list[int]]]:
        """[(worker, experts, counts)] in send order; each worker's rows are contiguous."""
        out: list[tuple[int, list[int], list[int]]] = []
        for worker, expert, count in zip(self.workers, self.experts, self.counts):
            if not out or out[-1][0] != worker:
                out.append((worker, [], []))
            out[-1][1].append(expert)
            out[-1][2].append(count)
        return out


def plan_dispatch(top_k_index: torch.Tensor, pair_worker: torch.Tensor, num_experts: int) -> Dispatch:
    """Sort a layer's token-expert pairs so each worker gets one contiguous block, grouped by expert.

    top_k_index: [T, K] expert ids; pair_worker: [T, K] the worker that serves each pair in this call.
    """
    flat = top_k_index.reshape(-1)  # [S]
    key = pair_worker.reshape(-1) * num_experts + flat  # [S]
    order = torch.argsort(key, stable=True)  # [S]
    counts = torch.bincount(key)  # [W * E]
    groups = counts.nonzero().squeeze(1)  # [G]
    return Dispatch(
        order=order,
        workers=(groups // num_experts).tolist(),
        experts=(groups % num_experts).tolist(),
        counts=counts[groups].tolist(),
    )


def combine(pair_out: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """[S, D] expert outputs in pair order -> [T, D] sum over each token's experts, gate-weighted."""
    tokens, top_k = top_k_weights.shape
    weighted = pair_out.view(tokens, top_k, -1) * top_k_weights.unsqueeze(-1)  # [T, K, D]
    return weighted.sum(dim=1)  # [T, D]
