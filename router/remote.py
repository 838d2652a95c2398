"""The seam between transformers and moecluster: an experts implementation that runs routed experts remotely.

Every family decorated with `@use_experts_implementation` calls the registered function with
(hidden_states, top_k_index, top_k_weights) after its own gate, so the model's routing stays transformers'.
"""

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from router.dispatch import combine, gather_rows, plan_dispatch

IMPLEMENTATION = "moecluster"


class RemoteExperts:
    """One MoE layer's routed experts, served by workers through `client`."""

    def __init__(self, layer: int, expert_worker: torch.Tensor, client):
        self.layer = layer
        self.expert_worker = expert_worker  # [E] worker index serving each expert
        self.client = client

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        dispatch = plan_dispatch(top_k_index, self.expert_worker)
        rows = gather_rows(hidden, dispatch, top_k_index.shape[-1])
        out = self.client.forward(self.layer, dispatch, rows)
        return combine(out, dispatch, top_k_weights).to(hidden.dtype)


def _remote_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    return module.remote(hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _remote_experts_forward)
