"""The serving side of a checkpoint: everything but the routed experts, loaded with transformers."""

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from experts.checkpoint import Checkpoint, CheckpointError
from experts.layout import experts_modules, load_config, resolve_dtype


def load_dense_model(model_dir, dtype: str | torch.dtype | None = "auto",
                     device: str | torch.device = "cpu") -> nn.Module:
    """The model on `device`, with its routed experts' weights left out: `router.seam.route_experts` puts them
    behind a router before its first forward."""
    config = load_config(model_dir)
    dtype = resolve_dtype(config, dtype, device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = experts_modules(model)
    if not layers:
        raise CheckpointError(f"{model_dir}: {config.model_type} has no routed experts: not an MoE checkpoint")
    for module in layers.values():
        module._parameters.clear()
        module._is_hf_initialized = True  # nothing to initialise: the weights live on the workers
    model.to_empty(device=device)
    model.initialize_weights()  # non-persistent buffers (rotary frequencies) are computed, not loaded
    _load_dense_tensors(model, Checkpoint(model_dir), dtype)
    return model.eval().requires_grad_(False)


def _load_dense_tensors(model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = model.state_dict()
    loaded = set()
    for name in checkpoint.dense_names():
        target, _ = rename_source_key(name, renamings, converters, model.base_model_prefix, expected)
        if target not in expected:
            continue
        tensor = checkpoint.read(name)
        if tensor.shape != expected[target].shape:
            raise CheckpointError(
                f"{checkpoint.path / checkpoint.files[name]}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[target].shape)}"
            )
        expected[target].copy_(tensor.to(dtype) if tensor.is_floating_point() else tensor)
        loaded.add(target)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    persistent = {name for name in expected if name not in dict(model.named_buffers()) or _is_persistent(model, name)}
    missing = sorted(persistent - loaded - tied)
    if missing:
        raise CheckpointError(f"{checkpoint.path}: tensor {missing[0]!r} is missing from the checkpoint")
    model.tie_weights()


def _is_persistent(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf not in model.get_submodule(owner)._non_persistent_buffers_set
