"""A family's shared experts (Qwen2-MoE, DeepSeek-V3) computed while its routed experts are on the workers.

A MoE block calls its shared expert and its routed experts on the same hidden states, in an order of its own
(Qwen2-MoE: shared first; DeepSeek-V3: routed first). `DeferredShared` stands in for the shared expert so that
its math runs inside the routed call, once the requests are sent (`ExpertRouter` calls `compute`):
- called before the routed call, it answers an empty tensor, which `compute` fills before the block reads it;
- called after, it answers what `compute` computed.
Calls are matched by their hidden states' storage, so micro-batches at the same layer keep theirs apart.

T = tokens, D = hidden
"""

import torch
from torch import nn

SHARED_NAMES = ("shared_expert", "shared_experts")  # the attribute a block holds its shared expert in


class DeferredShared(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self._owed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # asked before the routed call: (in, out)
        self._computed: dict[tuple, torch.Tensor] = {}  # computed in the routed call, not yet asked for

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        key = _key(hidden)
        if key in self._computed:
            return self._computed.pop(key).view(hidden.shape)
        if self._computed:  # the block calls its routed experts first, and they were given other hidden states
            raise RuntimeError("the shared expert's input is not its routed experts' input")
        out = torch.empty_like(hidden)
        self._owed[key] = (hidden, out)
        return out

    def compute(self, hidden: torch.Tensor) -> None:
        """The shared expert of `hidden` [T, D], the routed call's input: into the tensor already handed out for
        it, or kept for the block's call to come."""
        key = _key(hidden)
        owed = self._owed.pop(key, None)
        if owed is None and self._owed:  # asked first, for other hidden states: that answer would stay empty
            raise RuntimeError("the routed experts' input is not their shared expert's input")
        if owed is None:
            self._computed[key] = self.inner(hidden)
        else:
            owed[1].copy_(self.inner(owed[0]))

    def forget(self, hidden: torch.Tensor) -> None:
        """The routed call of `hidden` failed: nothing of it stays owed or kept."""
        self._owed.pop(_key(hidden), None)
        self._computed.pop(_key(hidden), None)


def defer_shared_experts(block: nn.Module) -> DeferredShared | None:
    """Put `block`'s shared expert, if it has one, behind a DeferredShared; that one."""
    for name in SHARED_NAMES:
        inner = getattr(block, name, None)
        if isinstance(inner, DeferredShared):
            return inner
        if isinstance(inner, nn.Module):
            deferred = DeferredShared(inner)
            setattr(block, name, deferred)
            return deferred
    return None


def _key(hidden: torch.Tensor) -> tuple:
    return hidden.device, hidden.data_ptr(), hidden.numel()
