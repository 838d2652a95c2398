"""Where a transformers MoE model keeps its routed experts, found without allocating any weights."""

import re

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

_LAYER = re.compile(r"layers\.(\d+)\.")


def load_config(model_dir) -> PretrainedConfig:
    return AutoConfig.from_pretrained(model_dir)


def meta_model(config: PretrainedConfig) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def is_routed_experts(module: nn.Module) -> bool:
    # `@use_experts_implementation` marks the modules whose forward takes (hidden, top_k_index, top_k_weights).
    return hasattr(module, "is_concatenated") and hasattr(module, "num_experts")


def experts_paths(model: nn.Module) -> dict[int, str]:
    """{layer index: module path of its routed experts} for every MoE layer, in layer order."""
    found = {int(_LAYER.search(name)[1]): name for name, m in model.named_modules() if is_routed_experts(m)}
    return dict(sorted(found.items()))


def experts_modules(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: routed experts module} for every MoE layer, in layer order."""
    return {layer: model.get_submodule(path) for layer, path in experts_paths(model).items()}


def moe_shape(model_dir) -> dict[int, int]:
    """{layer: number of routed experts} of a checkpoint's model."""
    return {layer: m.num_experts for layer, m in experts_modules(meta_model(load_config(model_dir))).items()}


def resolve_dtype(config: PretrainedConfig, dtype: str | torch.dtype | None,
                  device: str | torch.device = "cpu") -> torch.dtype:
    """The compute dtype on `device`: the checkpoint's own for "auto", but never float16 on a CPU (it runs ~100x
    slower there)."""
    if dtype in (None, "auto"):
        dtype = config.dtype or torch.float32
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    return torch.float32 if dtype == torch.float16 and torch.device(device).type == "cpu" else dtype


def expert_nbytes(model_dir, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu") -> int:
    """Bytes of one routed expert's weights (the largest layer's), as a worker on `device` holds them."""
    config = load_config(model_dir)
    itemsize = resolve_dtype(config, dtype, device).itemsize
    layers = experts_modules(meta_model(config)).values()
    return max(sum(p.numel() for p in m.parameters()) // m.num_experts for m in layers) * itemsize
