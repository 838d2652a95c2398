"""One forward per engine step. The running batch's decode tokens and the prompt pieces prefilled beside them are
packed into one row of tokens, so that every layer but attention (embeddings, projections, the MoE layers and
their calls to the expert workers) runs once per step, whatever the step carries. Attention runs group by group,
each group over its own KV cache: the running batch (one query per row), and each prompt piece (its queries after
the positions its prompt has cached).

T = packed tokens, G = a group's rows, q = a group's queries per row, S = a group's key positions, H = heads,
D = head dim
"""

import functools
import inspect
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "moecluster_packed_"
# A 4D mask is taken as prepared: the model builds none for a packed forward, whose attention builds each group's.
PREPARED_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


@dataclass
class Group:
    cache: DynamicCache
    key_mask: torch.Tensor  # [G, S]: 1 where a key position holds a token once this step's are cached, 0 padding
    positions: torch.Tensor  # [G, q]: each query's position in its sequence
    start: int  # its first token in the packed row

    @property
    def end(self) -> int:
        return self.start + self.positions.numel()

    def split(self, packed: torch.Tensor) -> torch.Tensor:
        """Its rows of a packed [1, H, T, D] tensor: [G, H, q, D]."""
        return packed[0, :, self.start:self.end].unflatten(1, self.positions.shape).transpose(0, 1)

    def allowed(self, window: int | None) -> torch.Tensor:
        """[G, 1, q, S]: which keys each query attends to, causal and within `window` positions (None: all)."""
        keys = (self.key_mask.cumsum(-1) - 1)[:, None, :]  # [G, 1, S]
        queries = self.positions[:, :, None]  # [G, q, 1]
        allowed = self.key_mask.bool()[:, None, :] & (keys <= queries)
        if window is not None:
            allowed &= keys > queries - window
        return allowed[:, None]


@dataclass
class PackedStep:
    """What a packed forward is given as its cache: each layer's new keys and values go, split by group, into the
    groups' own caches, and packed attention reads each group's whole keys and values back from here."""

    groups: list[Group]
    kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # by layer, by group
    _masks: dict = field(default_factory=dict)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.kv[layer_idx] = [group.cache.update(group.split(keys), group.split(values), layer_idx, *args, **kwargs)
                              for group in self.groups]
        return keys, values

    def mask(self, index: int, window: int | None, additive_dtype: torch.dtype | None) -> torch.Tensor:
        """Group `index`'s mask: boolean, or added to the scores in `additive_dtype` (eager attention's form)."""
        key = (index, window, additive_dtype)
        if key not in self._masks:
            allowed = self.groups[index].allowed(window)
            if additive_dtype is not None:
                allowed = torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device).masked_fill(
                    ~allowed, torch.finfo(additive_dtype).min)
            self._masks[key] = allowed
        return self._masks[key]


def use_packed_attention(model) -> None:
    """Let `model` run packed forwards (`packed_step=` a PackedStep): its attention becomes one that runs each
    group with the model's own implementation, and any other forward exactly as before."""
    base = model.config._attn_implementation
    if base.startswith(PREFIX):
        return
    if base not in ("sdpa", "eager"):
        raise ValueError(f"the engine packs steps with sdpa or eager attention, not {base!r}")
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, functools.partial(_packed_attention, base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.config._attn_implementation = name


def _packed_attention(base: str, module, query, key, value, attention_mask, packed_step: PackedStep | None = None,
                      **kwargs):
    attend = ALL_ATTENTION_FUNCTIONS[base] if base != "eager" else _eager(type(module))
    if packed_step is None:
        return attend(module, query, key, value, attention_mask, **kwargs)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    additive = None if base == "sdpa" else query.dtype
    out = []
    for index, (group, cached) in enumerate(zip(packed_step.groups, packed_step.kv[module.layer_idx])):
        keys, values = _keys_values(module, cached)
        rows, _ = attend(module, group.split(query), keys, values, packed_step.mask(index, window, additive), **kwargs)
        out.append(rows.flatten(0, 1))  # [G, q, H, D] -> [G * q, H, D]
    return torch.cat(out)[None], None  # [1, T, H, D]


def _keys_values(module, cached: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    # Multi-head latent attention caches the compressed latents; its module expands them after the cache.
    return module.expand_kv(*cached) if hasattr(module, "expand_kv") else cached


@functools.cache
def _eager(module_type: type):
    """The model's own eager attention (a family may add to it: GPT-OSS's sinks)."""
    return inspect.getmodule(module_type).eager_attention_forward
