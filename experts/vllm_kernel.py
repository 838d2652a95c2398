"""vllm's fused MoE kernel for expert workers on a GPU, where vllm is installed and the family fits it."""

import torch
from torch import nn


def kernel_applies(module: nn.Module, device: torch.device) -> bool:
    # vllm's fused_experts computes silu(x @ gate.T) * (x @ up.T) @ down.T on [E, 2I, D] / [E, D, I] weights:
    # exactly the concatenated, untransposed, bias-free SwiGLU families (all but GPT-OSS).
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    return (
        device.type == "cuda"
        and module.is_concatenated
        and not module.is_transposed
        and not module.has_bias
        and act == "silu"
    )


def fused_moe_or_none(module: nn.Module, device: torch.device):
    if not kernel_applies(module, device):
        return None
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except ImportError:
        return None

    def forward(hidden, gate_up, down, weights, ids):
        return fused_experts(hidden, gate_up, down, topk_weights=weights.float(), topk_ids=ids.to(torch.int32))

    return forward
