"""A worker's bank keeps each expert's math exact while experts are added and removed around it."""

import pytest
import torch

from experts.bank import ExpertBank
from experts.families import ARCHS
from experts.layout import load_config, moe_shape


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_kept_across_add_and_remove_compute_as_freshly_loaded(checkpoints, arch):
    path = checkpoints[arch]
    layer = next(iter(moe_shape(path)))
    grown = ExpertBank(path, [(layer, 3)])
    grown.add([(layer, 1), (layer, 2)])
    grown.remove([(layer, 2)])
    x = torch.randn(5, load_config(path).hidden_size, generator=torch.Generator().manual_seed(0))
    fresh = ExpertBank(path, [(layer, 1), (layer, 3)]).forward(layer, [1, 3], [2, 3], x)
    torch.testing.assert_close(grown.forward(layer, [1, 3], [2, 3], x), fresh, rtol=0, atol=0)
    assert grown.pairs == [(layer, 1), (layer, 3)]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_decode_call_batched_over_all_experts_equals_a_gemm_per_group(checkpoints, arch, monkeypatch):
    from experts import bank

    path = checkpoints[arch]
    layer, experts = next(iter(moe_shape(path).items()))
    hosted = ExpertBank(path, [(layer, e) for e in range(experts)])
    counts = [3, 0, 5, 1][: experts] + [2] * (experts - 4)
    used = [e for e, n in enumerate(counts) if n]
    x = torch.randn(sum(counts), load_config(path).hidden_size, generator=torch.Generator().manual_seed(0))
    calls = []
    monkeypatch.setattr(bank._LayerExperts, "_batched", lambda self, *a, f=bank._LayerExperts._batched: calls.append(1)
                        or f(self, *a))
    batched = hosted.forward(layer, used, [counts[e] for e in used], x)
    assert calls == [1] or hosted.layers[layer].fused_moe is not None
    monkeypatch.setattr(bank, "BATCHED_MAX_ROWS", 0)  # every call a GEMM per group
    torch.testing.assert_close(batched, hosted.forward(layer, used, [counts[e] for e in used], x),
                               rtol=1e-5, atol=1e-5)
