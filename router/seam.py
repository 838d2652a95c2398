"""The one seam between transformers and moecluster: `route_experts(model, router)` puts every routed experts
module of a transformers model behind an ExpertRouter, and each shared expert inside its layer's routed call
(router/shared.py).

Every family decorated with `@use_experts_implementation` calls the selected implementation with
(hidden_states, top_k_index, top_k_weights) after its own gate, so the model's routing stays transformers'.
"""

import functools

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from experts.layout import experts_paths
from router.shared import defer_shared_experts

IMPLEMENTATION = "moecluster"


def route_experts(model, router) -> None:
    """Select moecluster's experts implementation on `model`, bind each experts module to `router.forward` for
    its layer, defer each shared expert to its layer's routed call, and time the gates in `router.timings`."""
    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _routed_forward)
    for layer, path in experts_paths(model).items():
        model.get_submodule(path).moecluster_route = functools.partial(router.forward, layer)
        block = model.get_submodule(path.rpartition(".")[0])
        shared = defer_shared_experts(block)
        if shared is not None:
            router.shared[layer] = shared
        for gate in ("gate", "router"):
            if isinstance(getattr(block, gate, None), torch.nn.Module):
                router.timings.gate_hooks(getattr(block, gate))
    model.set_experts_implementation(IMPLEMENTATION)


def _routed_forward(module, hidden_states, top_k_index, top_k_weights):
    return module.moecluster_route(hidden_states, top_k_index, top_k_weights)
