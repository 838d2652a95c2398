"""Each family's gate, in pure torch, against the router module transformers builds from a demo checkpoint."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from experts.families import ARCHS
from router.gating import GateSpec, gate_logits, gate_spec, model_gate, sigmoid_grouped_topk, softmax_topk, topk_softmax


@pytest.fixture(scope="module")
def routers(checkpoints):
    """{arch: (config, the router of its last MoE layer)}; DeepSeek's first layer is dense."""
    out = {}
    for arch in ARCHS:
        model = AutoModelForCausalLM.from_pretrained(checkpoints[arch], dtype=torch.float32)
        router = [m for m in model.modules() if type(m).__name__.endswith("Router")][-1]
        out[arch] = (model.config, router)
    return out


def by_expert(index, weights):
    """Sort each token's experts so selection order (unsorted top-k, ties) does not matter."""
    index, order = index.sort(dim=-1)
    return index, weights.gather(1, order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_gate_equals_transformers_router(routers, arch, dtype):
    config, router = routers[arch]
    router = copy.deepcopy(router).to(dtype)
    if hasattr(router, "e_score_correction_bias"):  # a buffer, which the demo checkpoint leaves at zero
        bias = torch.randn(router.num_experts, generator=torch.Generator().manual_seed(5))
        router.e_score_correction_bias.copy_(bias)
    hidden = torch.randn(97, config.hidden_size, generator=torch.Generator().manual_seed(3)).to(dtype)
    spec = gate_spec(config.model_type, config.to_dict())
    with torch.no_grad():
        their_logits, their_weights, their_index = router(hidden)
        logits = gate_logits(spec, hidden, router.weight, getattr(router, "bias", None))
        index, weights = model_gate(spec, logits, getattr(router, "e_score_correction_bias", None))

    assert torch.equal(logits, their_logits)
    assert weights.dtype == their_weights.dtype
    index, weights = by_expert(index, weights)
    their_index, their_weights = by_expert(their_index, their_weights)
    assert torch.equal(index, their_index)
    torch.testing.assert_close(weights, their_weights, rtol=0, atol=1e-6)


def test_family_specs():
    assert gate_spec("mixtral", {"num_experts_per_tok": 2}) == GateSpec("softmax_topk", 2, True, cast_back=False)
    assert gate_spec("qwen3_moe", {"num_experts_per_tok": 8, "norm_topk_prob": True}).normalize
    config = {"num_experts_per_tok": 8, "norm_topk_prob": True, "n_group": 8, "topk_group": 4}
    deepseek = gate_spec("deepseek_v3", config | {"routed_scaling_factor": 2.5})
    assert (deepseek.kind, deepseek.n_group, deepseek.topk_group, deepseek.scaling_factor) == (
        "sigmoid_grouped_topk",
        8,
        4,
        2.5,
    )
    with pytest.raises(ValueError, match="known: mixtral, qwen2_moe"):
        gate_spec("llama", {})
    with pytest.raises(ValueError, match="norm_topk_prob"):
        gate_spec("olmoe", {"num_experts_per_tok": 2})


def test_softmax_topk_normalises_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    _, raw = softmax_topk(logits, 2, normalize=False)
    _, normed = softmax_topk(logits, 2, normalize=True)
    assert raw.sum() < 1
    torch.testing.assert_close(normed.sum(), torch.tensor(1.0))
    torch.testing.assert_close(normed, raw / raw.sum())


def test_topk_softmax_weighs_only_the_chosen_logits():
    index, weights = topk_softmax(torch.tensor([[0.0, 3.0, 1.0, 3.0 - math.log(3.0)]]), 2)
    assert sorted(index[0].tolist()) == [1, 3]
    torch.testing.assert_close(weights[0].sort().values, torch.tensor([0.25, 0.75]))


def test_sigmoid_grouped_topk_bias_selects_but_does_not_weigh():
    logits = torch.tensor([[3.0, 2.0, -1.0, 0.0, 1.0, 0.5, -2.0, -3.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0])  # lifts expert 7 and so group 3
    index, weights = sigmoid_grouped_topk(logits, bias, 2, n_group=4, topk_group=2, normalize=False, scaling_factor=2.0)
    index, weights = by_expert(index, weights)
    assert index.tolist() == [[0, 7]]  # groups {0, 1} and {6, 7} win; best biased experts in them
    torch.testing.assert_close(weights, 2.0 * logits[:, [0, 7]].sigmoid())
