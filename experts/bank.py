"""The (layer, expert) weights one worker hosts, computed with the family's own transformers Experts module."""

import copy
import itertools
import threading
from collections import defaultdict

import torch
from torch import nn

from experts.checkpoint import Checkpoint, CheckpointError
from experts.layout import experts_modules, load_config, meta_model, resolve_dtype
from experts.vllm_kernel import fused_moe_or_none

# A call whose groups are all this small and cover most hosted experts (a decode step's) runs as one batched GEMM
# per projection; larger groups (prefill) run a GEMM each, which pads nothing.
BATCHED_MAX_ROWS = 64


class ExpertNotHosted(KeyError):
    pass


class _LayerExperts:
    """One layer's hosted experts: a transformers Experts module holding only them, and their local ids."""

    def __init__(self, module: nn.Module, experts: list[int], num_experts: int, fused_moe=None):
        self.module, self.experts, self.fused_moe = module, experts, fused_moe
        self.local_id = torch.full((num_experts,), -1, dtype=torch.long)
        self.local_id[experts] = torch.arange(len(experts))
        self.transposed_here = fused_moe is None and not module.is_transposed
        if self.transposed_here:
            _to_input_major(module)

    def checkpoint_row(self, name: str, expert: int) -> torch.Tensor:
        """Expert `expert`'s slice of parameter `name`, in the checkpoint's layout."""
        row = getattr(self.module, name)[self.local_id[expert]]
        return row.T if self.transposed_here and row.dim() == 2 else row

    def forward(self, experts: list[int], counts: list[int], hidden: torch.Tensor) -> torch.Tensor:
        # N = rows, D = hidden
        local = self.local_id[experts]
        if (local < 0).any():
            missing = [e for e, i in zip(experts, local.tolist()) if i < 0]
            raise ExpertNotHosted(f"experts {missing} are not hosted here")
        if self.fused_moe is not None:
            ids = local.repeat_interleave(torch.tensor(counts))[:, None].to(hidden.device)  # [N, 1]
            ones = torch.ones(ids.shape, dtype=hidden.dtype, device=hidden.device)  # [N, 1]: the router weighs
            return self.fused_moe(hidden, self.module.gate_up_proj, self.module.down_proj, ones, ids)
        if len(counts) > 1 and 2 * len(counts) >= len(self.experts) and max(counts) <= BATCHED_MAX_ROWS:
            return self._batched(local, counts, hidden)
        m, spans = self.module, _spans(local.tolist(), counts)
        up_name = "gate_up_proj" if m.has_gate else "up_proj"
        up_proj = getattr(m, up_name)
        up = hidden.new_empty((hidden.shape[0], up_proj.shape[2] if m.is_transposed else up_proj.shape[1]))  # [N, 2I]
        for i, rows in spans:  # rows arrive grouped by expert: one GEMM per group
            _linear_into(hidden[rows], up_proj[i], m.is_transposed, _bias(m, f"{up_name}_bias", i), up[rows])
        h = m._apply_gate(up) if m.has_gate else m.act_fn(up)  # [N, I]: the family's activation, once per call
        out = torch.empty_like(hidden)  # [N, D]
        for i, rows in spans:
            _linear_into(h[rows], m.down_proj[i], m.is_transposed, _bias(m, "down_proj_bias", i), out[rows])
        return out


    def _batched(self, local: torch.Tensor, counts: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """The same math as one GEMM per group, as one batched GEMM per projection over every hosted expert, each
        group's rows padded to the largest group: when a call touches most hosted experts (decode), fewer and
        larger ops beat many GEMMs of a few rows. G = hosted experts, W = rows of the largest group."""
        m, width = self.module, max(counts)
        slots = torch.tensor([g * width + i for g, n in zip(local.tolist(), counts) for i in range(n)],
                             device=hidden.device)  # [N] into [G * W]
        padded = hidden.new_zeros(len(self.experts) * width, hidden.shape[1]).index_copy_(0, slots, hidden)  # [G*W, D]
        up_name = "gate_up_proj" if m.has_gate else "up_proj"
        up = _bmm(padded.view(len(self.experts), width, -1), getattr(m, up_name), m, f"{up_name}_bias")  # [G, W, 2I]
        h = m._apply_gate(up) if m.has_gate else m.act_fn(up)  # [G, W, I]
        return _bmm(h, m.down_proj, m, "down_proj_bias").flatten(0, 1).index_select(0, slots)  # [N, D]


def _bmm(x: torch.Tensor, weight: torch.Tensor, module: nn.Module, bias: str) -> torch.Tensor:
    """[G, W, in] @ each expert's [in, out] (or its [out, in] transposed) -> [G, W, out], plus its bias."""
    out = torch.bmm(x, weight if module.is_transposed else weight.transpose(1, 2))
    return out + getattr(module, bias)[:, None] if module.has_bias else out


def _spans(local: list[int], counts: list[int]) -> list[tuple[int, slice]]:
    """(local expert, its rows) for rows grouped by expert."""
    ends = itertools.accumulate(counts)
    return [(i, slice(end - n, end)) for i, n, end in zip(local, counts, ends)]


def _to_input_major(module: nn.Module) -> None:
    """[E, out, in] -> [E, in, out] contiguous, so each expert's GEMM is x @ W on a contiguous W: at decode
    sizes (a few rows per expert) that is faster than x @ W.T on the checkpoint's layout."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.dim() == 3:
            setattr(module, name, nn.Parameter(param.transpose(1, 2).contiguous(), requires_grad=False))
    module.is_transposed = True


def _linear_into(x: torch.Tensor, weight: torch.Tensor, transposed: bool, bias: torch.Tensor | None,
                 out: torch.Tensor) -> None:
    torch.mm(x, weight if transposed else weight.T, out=out)
    if bias is not None:
        out += bias


def _bias(module: nn.Module, name: str, i: int) -> torch.Tensor | None:
    return getattr(module, name)[i] if module.has_bias else None


class ExpertBank:
    """A worker's experts. `add` and `remove` swap a layer's module whole, so a forward in flight is never torn."""

    def __init__(self, model_dir, pairs: list[tuple[int, int]], dtype: torch.dtype | None = None, device="cpu"):
        config = load_config(model_dir)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config, dtype, self.device)
        self.templates = experts_modules(meta_model(config))
        self.checkpoint = Checkpoint(model_dir)
        self.layers: dict[int, _LayerExperts] = {}
        self._lock = threading.Lock()
        self.add(pairs)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return sorted((layer, e) for layer, hosted in self.layers.items() for e in hosted.experts)

    def add(self, pairs: list[tuple[int, int]]) -> None:
        self._check(pairs)
        self._rebuild(set(self.pairs) | set(map(tuple, pairs)))

    def remove(self, pairs: list[tuple[int, int]]) -> None:
        self._rebuild(set(self.pairs) - set(map(tuple, pairs)))

    def _check(self, pairs) -> None:
        for layer, expert in pairs:
            if layer not in self.templates or not 0 <= expert < self.templates[layer].num_experts:
                raise CheckpointError(f"{self.checkpoint.path}: the model has no routed expert ({layer}, {expert})")

    def _rebuild(self, pairs: set[tuple[int, int]]) -> None:
        with self._lock:
            by_layer = defaultdict(list)
            for layer, expert in sorted(pairs):
                by_layer[layer].append(expert)
            layers = {}
            for layer, experts in by_layer.items():
                if layer in self.layers and self.layers[layer].experts == experts:
                    layers[layer] = self.layers[layer]
                    continue
                module = self._build(layer, experts)
                layers[layer] = _LayerExperts(module, experts, self.templates[layer].num_experts,
                                              fused_moe_or_none(module, self.device))
            self.layers = layers

    def _build(self, layer: int, experts: list[int]) -> nn.Module:
        template = self.templates[layer]
        module = copy.copy(template)  # the family's module (its gate activation, layout flags), own parameters
        module._parameters = dict(template._parameters)
        module.num_experts = len(experts)
        old = self.layers.get(layer)
        for name, param in template.named_parameters(recurse=False):
            data = torch.empty((len(experts), *param.shape[1:]), dtype=self.dtype, device=self.device)
            for i, expert in enumerate(experts):
                kept = old is not None and expert in old.experts
                data[i] = old.checkpoint_row(name, expert) if kept else self._read_checked(module, name, layer, expert,
                                                                                            data.shape[1:])
            setattr(module, name, nn.Parameter(data, requires_grad=False))
        return module

    def _read_checked(self, module: nn.Module, param: str, layer: int, expert: int, shape) -> torch.Tensor:
        row = self._read(module, param, layer, expert)
        if row.shape != shape:
            raise CheckpointError(f"{self.checkpoint.path}: layer {layer} expert {expert} {param} has shape "
                                  f"{tuple(row.shape)}, the model expects {tuple(shape)}")
        return row

    def _read(self, module: nn.Module, param: str, layer: int, expert: int) -> torch.Tensor:
        checkpoint = self.checkpoint
        fused = checkpoint.fused_names.get(layer)
        if fused:
            if param in fused:
                return checkpoint.read_row(fused[param], expert)
            blocks, scales = fused.get(f"{param}_blocks"), fused.get(f"{param}_scales")
            if blocks and scales:
                return checkpoint.read_mxfp4_row(blocks, scales, expert, self.dtype)
            raise CheckpointError(f"{checkpoint.path}: tensor for layer {layer} experts.{param} is missing")
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
        """The experts' outputs on the bank's device, in its dtype: the caller decides when they go to the host."""
        hosted = self.layers.get(layer)
        if hosted is None:
            raise ExpertNotHosted(f"layer {layer} has no experts hosted here")
        return hosted.forward(experts, counts, hidden.to(self.device, self.dtype))

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for h in self.layers.values() for p in h.module.parameters())
