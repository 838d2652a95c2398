import torch

from router.dispatch import combine, plan_dispatch


def reference_moe(hidden, top_k_index, top_k_weights, expert_fn):
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(top_k_index.shape[1]):
            e = int(top_k_index[t, k])
            out[t] += top_k_weights[t, k] * expert_fn(e, hidden[t : t + 1])[0]
    return out


def test_dispatch_then_combine_equals_per_token_loop():
    torch.manual_seed(0)
    tokens, top_k, experts, hidden_size = 11, 3, 6, 5
    hidden = torch.randn(tokens, hidden_size)
    top_k_index = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    top_k_weights = torch.rand(tokens, top_k)
    scale = torch.arange(1, experts + 1, dtype=torch.float32)
    expert_worker = torch.tensor([0, 1, 2, 0, 1, 2])

    dispatch = plan_dispatch(top_k_index, expert_worker[top_k_index], experts)
    rows = hidden[dispatch.order // top_k]  # [S, D] as sent
    row_expert = torch.repeat_interleave(torch.tensor(dispatch.experts), torch.tensor(dispatch.counts))
    pair_out = torch.empty_like(rows)
    pair_out[dispatch.order] = rows * scale[row_expert, None]  # back in pair order
    out = combine(pair_out, top_k_weights)

    expected = reference_moe(hidden, top_k_index, top_k_weights, lambda e, x: x * scale[e])
    torch.testing.assert_close(out, expected)


def test_each_worker_gets_one_contiguous_block_grouped_by_expert():
    top_k_index = torch.tensor([[3, 0], [1, 3], [2, 0]])
    dispatch = plan_dispatch(top_k_index, torch.tensor([1, 0, 1, 0])[top_k_index], 4)
    assert dispatch.per_worker() == [(0, [1, 3], [1, 2]), (1, [0, 2], [2, 1])]
    assert sum(dispatch.counts) == top_k_index.numel()
    assert sorted(dispatch.order.tolist()) == list(range(6))
