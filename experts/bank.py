"""The (layer, expert) weights one worker hosts, computed with the family's own transformers Experts module."""

import copy
from collections import defaultdict

import torch
from torch import nn

from experts.checkpoint import Checkpoint, CheckpointError
from experts.layout import experts_modules, load_config, meta_model, resolve_dtype
from experts.vllm_kernel import fused_moe_or_none


class ExpertNotHosted(KeyError):
    pass


class _LayerExperts:
    """One layer's hosted experts: a transformers Experts module holding only them, and their local ids."""

    def __init__(self, module: nn.Module, experts: list[int], num_experts: int, fused_moe=None):
        self.module = module
        self.fused_moe = fused_moe
        self.local_id = torch.full((num_experts,), -1, dtype=torch.long)
        self.local_id[experts] = torch.arange(len(experts))

    def forward(self, experts: list[int], counts: list[int], hidden: torch.Tensor) -> torch.Tensor:
        # N = rows, D = hidden
        local = self.local_id[experts]
        if (local < 0).any():
            missing = [e for e, i in zip(experts, local.tolist()) if i < 0]
            raise ExpertNotHosted(f"experts {missing} are not hosted here")
        ids = local.repeat_interleave(torch.tensor(counts))[:, None]  # [N, 1]
        ones = torch.ones(ids.shape, dtype=hidden.dtype)  # [N, 1]: the router applies the gate weights
        if self.fused_moe is not None:
            return self.fused_moe(hidden, self.module.gate_up_proj, self.module.down_proj, ones, ids)
        return self.module(hidden, ids, ones)  # [N, D]


class ExpertBank:
    def __init__(self, model_dir, pairs: list[tuple[int, int]], dtype: torch.dtype | None = None, device="cpu"):
        config = load_config(model_dir)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config, dtype, self.device.type)
        self.pairs = sorted(set(pairs))
        templates = experts_modules(meta_model(config))
        checkpoint = Checkpoint(model_dir)
        by_layer = defaultdict(list)
        for layer, expert in self.pairs:
            if layer not in templates or not 0 <= expert < templates[layer].num_experts:
                raise CheckpointError(f"{model_dir}: the model has no routed expert ({layer}, {expert})")
            by_layer[layer].append(expert)
        self.layers = {}
        for layer, experts in by_layer.items():
            module = self._load(checkpoint, templates[layer], layer, experts)
            kernel = fused_moe_or_none(module, self.device)
            self.layers[layer] = _LayerExperts(module, experts, templates[layer].num_experts, kernel)

    def _load(self, checkpoint: Checkpoint, template: nn.Module, layer: int, experts: list[int]) -> nn.Module:
        module = copy.copy(template)  # shares nothing mutable but the config, replaced below
        module._parameters = dict(template._parameters)
        module.config = copy.copy(template.config)
        module.config._experts_implementation = "grouped_mm"
        module.num_experts = len(experts)
        for name, param in template.named_parameters(recurse=False):
            data = torch.empty((len(experts), *param.shape[1:]), dtype=self.dtype, device=self.device)
            for i, expert in enumerate(experts):
                data[i] = self._read(checkpoint, module, name, layer, expert)
            setattr(module, name, nn.Parameter(data, requires_grad=False))
        return module

    @staticmethod
    def _read(checkpoint: Checkpoint, module: nn.Module, param: str, layer: int, expert: int) -> torch.Tensor:
        fused = checkpoint.fused_names.get(layer)
        if fused:
            if param not in fused:
                raise CheckpointError(f"{checkpoint.path}: tensor for layer {layer} experts.{param} is missing")
            return checkpoint.read_row(fused[param], expert)
        names = checkpoint.expert_names.get((layer, expert), {})
        role = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}.get(param)
        if role is None or module.is_transposed or not module.is_concatenated:
            raise CheckpointError(f"{checkpoint.path}: cannot map per-expert tensors onto {type(module).__name__}.{param}")
        missing = [r for r in role if r not in names]
        if missing:
            raise CheckpointError(
                f"{checkpoint.path}: tensor for layer {layer} expert {expert} {missing[0]} projection is missing"
            )
        return torch.cat([checkpoint.read(names[r]) for r in role], dim=0)

    @torch.inference_mode()
    def forward(self, layer: int, experts: list[int], counts: list[int], hidden: torch.Tensor) -> torch.Tensor:
        if layer not in self.layers:
            raise ExpertNotHosted(f"layer {layer} has no experts hosted here")
        hidden = hidden.to(self.device, self.dtype)
        return self.layers[layer].forward(experts, counts, hidden)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for l in self.layers.values() for p in l.module.parameters())
