import pytest
import torch

from router.replicas import MIN_SPLIT, NoReplica, assign_workers


def test_single_replica_experts_go_to_their_worker():
    top_k_index = torch.tensor([[0, 1], [1, 2]])
    pair_worker = assign_workers(0, top_k_index, [[5], [6], [7]], outstanding={})
    assert pair_worker.tolist() == [[5, 6], [6, 7]]


def test_hot_expert_rows_split_over_replicas_least_loaded_first():
    rows = 3 * MIN_SPLIT
    top_k_index = torch.zeros(rows, 1, dtype=torch.long)
    pair_worker = assign_workers(0, top_k_index, [[0, 1, 2]], outstanding={})
    assert sorted(torch.bincount(pair_worker.flatten()).tolist()) == [MIN_SPLIT] * 3
    small = assign_workers(0, top_k_index[:4], [[0, 1, 2]], outstanding={0: 100, 1: 3, 2: 50})
    assert set(small.flatten().tolist()) == {1}


def test_expert_without_live_replica_is_named():
    with pytest.raises(NoReplica, match="layer 3 expert 1 has no live replica"):
        assign_workers(3, torch.tensor([[1]]), [[0], []], outstanding={})
