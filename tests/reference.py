"""Oracles and in-process stand-ins shared by the tests."""

import torch
from transformers import AutoModelForCausalLM

from cluster.placement import WorkerSlot, plan_placement, replica_counts
from experts.bank import ExpertBank
from experts.layout import experts_modules
from router.remote import ExpertRouter
from router.table import RoutingTable


def transformers_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def attach(model, path, num_workers: int, client_factory, replicas: int = 1) -> ExpertRouter:
    """Place the model's experts on `num_workers` banks and route its experts modules to them."""
    layers = experts_modules(model)
    shape = {layer: m.num_experts for layer, m in layers.items()}
    slots = [WorkerSlot(node=f"node-{i}") for i in range(num_workers)]
    plan = plan_placement(replica_counts(shape, {}, replicas), slots, expert_bytes=1)
    client = client_factory([ExpertBank(path, pairs) for pairs in plan])
    addresses = getattr(client, "addresses", {w: f"bank-{w}" for w in range(num_workers)})
    router = ExpertRouter(RoutingTable.from_plan(0, plan, addresses, shape), client)
    router.attach(model)
    return router
