import torch
from transformers import MixtralConfig

from cluster.engine import kv_batch

CONFIG = MixtralConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)


def _states(rows: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, 2, n, 16, generator=torch.Generator().manual_seed(seed))  # [B, H, n, Dh]


def test_growing_cache_equals_concatenation_without_copying_each_step():
    cache = kv_batch.new_cache(CONFIG)
    layer = cache.layers[0]
    want, buffers = torch.empty(3, 2, 0, 16), set()
    for step, n in enumerate([5] + [1] * 60):
        new = _states(3, n, step)
        keys, values = layer.update(new, new * 2)
        want = torch.cat([want, new], dim=-2)
        torch.testing.assert_close(keys, want, rtol=0, atol=0)
        torch.testing.assert_close(values, want * 2, rtol=0, atol=0)
        buffers.add(keys.data_ptr())
    assert len(buffers) <= 2  # 64 positions, then 130: two buffers for 65 positions


def test_row_surgery_then_growth_stays_exact():
    cache = kv_batch.new_cache(CONFIG)
    layer = cache.layers[0]
    first = _states(3, 4, 0)
    layer.update(first, first)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    mask = kv_batch.select_rows(cache, mask, [0, 2])  # keeps rows 0 and 2, drops their shared leading pad
    new = _states(2, 1, 1)
    keys, _ = layer.update(new, new)
    want = torch.cat([first[[0, 2], :, 1:], new], dim=-2)
    torch.testing.assert_close(keys, want, rtol=0, atol=0)
    assert mask.shape == (2, 3)


def test_left_padded_right_aligns_prompts_with_their_mask():
    from cluster.engine.kv_batch import left_padded

    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
