"""Oracles and in-process stand-ins shared by the tests."""

import torch
from transformers import AutoModelForCausalLM

from cluster.placement import expert_owner, plan_placement
from experts.bank import ExpertBank
from experts.layout import experts_modules
from router.remote import RemoteExperts


def transformers_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


class InProcessClient:
    """ExpertClient's contract with the banks called directly: no gRPC, no Ray."""

    def __init__(self, banks):
        self.banks = banks

    def forward(self, layer, dispatch, rows):
        outs, start = [], 0
        for worker, experts, counts in dispatch.per_worker():
            end = start + sum(counts)
            outs.append(self.banks[worker].forward(layer, experts, counts, rows[start:end]))
            start = end
        return torch.cat(outs)


def attach(model, path, num_workers: int, client_factory) -> list[ExpertBank]:
    """Place the model's experts on `num_workers` banks and route its experts modules to them."""
    layers = experts_modules(model)
    plan = plan_placement({layer: m.num_experts for layer, m in layers.items()}, num_workers)
    banks = [ExpertBank(path, pairs) for pairs in plan]
    client = client_factory(banks)
    owners = expert_owner(plan)
    for layer, module in layers.items():
        module.remote = RemoteExperts(layer, torch.tensor([owners[layer, e] for e in range(module.num_experts)]), client)
    return banks
