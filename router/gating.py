"""Each family's own gate, as transformers 5.24 computes it: router logits -> (experts, weights). Pure torch.

T = tokens, E = experts, K = experts per token, G = expert groups, D = hidden
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GATE_KINDS = ("softmax_topk", "topk_softmax", "sigmoid_grouped_topk")


@dataclass(frozen=True)
class GateSpec:
    """How one family turns router logits into top-k experts and their weights."""

    kind: str  # one of GATE_KINDS
    top_k: int
    normalize: bool = False  # renormalise the top-k weights to sum to 1
    cast_back: bool = True  # softmax_topk: weights in the logits' dtype (Qwen, OLMoE) or float32 (Mixtral)
    n_group: int = 1  # sigmoid_grouped_topk only
    topk_group: int = 1
    scaling_factor: float = 1.0
    fp32_logits: bool = False  # DeepSeek computes its router logits in float32 whatever the model's dtype

    def __post_init__(self):
        if self.kind not in GATE_KINDS:
            raise ValueError(f"unknown gate kind {self.kind!r}; choose one of {', '.join(GATE_KINDS)}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")


def softmax_topk(
    logits: torch.Tensor, top_k: int, normalize: bool, cast_back: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: softmax over all experts in float32, then top-k.

    logits: [T, E] -> index [T, K], weights [T, K].
    """
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, index = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return index, weights.to(logits.dtype) if cast_back else weights


def topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-OSS: top-k of the logits, then a softmax over those k alone, in the logits' dtype.

    logits: [T, E] -> index [T, K], weights [T, K].
    """
    top_logits, index = torch.topk(logits, top_k, dim=-1)  # [T, K]
    return index, torch.softmax(top_logits, dim=-1)


def sigmoid_grouped_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    normalize: bool,
    scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid scores; the correction bias steers selection only, within the best groups.

    logits: [T, E], correction_bias: [E] -> index [T, K], weights [T, K] from the unbiased scores.
    """
    scores = logits.sigmoid()  # [T, E]
    choice = scores if correction_bias is None else scores + correction_bias  # [T, E]
    choice = choice.masked_fill(~_kept_groups(choice, n_group, topk_group), float("-inf"))
    index = torch.topk(choice, top_k, dim=-1, sorted=False)[1]  # [T, K]
    weights = scores.gather(1, index)  # [T, K]
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return index, weights * scaling_factor


def _kept_groups(choice: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """[T, E] -> [T, E] bool: experts in the topk_group groups whose two best scores sum highest."""
    tokens, num_experts = choice.shape
    grouped = choice.view(tokens, n_group, num_experts // n_group)  # [T, G, E / G]
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    best_groups = torch.topk(group_scores, topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)  # [T, G]
    return group_mask.repeat_interleave(num_experts // n_group, dim=1)  # [T, E]


def model_gate(
    spec: GateSpec, logits: torch.Tensor, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's own routing. logits: [T, E], correction_bias: [E] (DeepSeek) -> index [T, K], weights [T, K]."""
    if spec.kind == "softmax_topk":
        return softmax_topk(logits, spec.top_k, spec.normalize, spec.cast_back)
    if spec.kind == "topk_softmax":
        return topk_softmax(logits, spec.top_k)
    return sigmoid_grouped_topk(
        logits, correction_bias, spec.top_k, spec.n_group, spec.topk_group, spec.normalize, spec.scaling_factor
    )


def gate_logits(
    spec: GateSpec, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """hidden: [T, D], weight: [E, D], bias: [E] (GPT-OSS) -> router logits [T, E]."""
    if spec.fp32_logits:
        return F.linear(hidden.float(), weight.float())
    return F.linear(hidden, weight, bias)


def _softmax_family(attrs: Mapping, normalize: bool | None = None, cast_back: bool = True) -> GateSpec:
    norm = _attr(attrs, "norm_topk_prob") if normalize is None else normalize
    return GateSpec("softmax_topk", _attr(attrs, "num_experts_per_tok"), bool(norm), cast_back)


def _deepseek(attrs: Mapping) -> GateSpec:
    return GateSpec(
        "sigmoid_grouped_topk",
        _attr(attrs, "num_experts_per_tok"),
        bool(_attr(attrs, "norm_topk_prob")),
        n_group=_attr(attrs, "n_group"),
        topk_group=_attr(attrs, "topk_group"),
        scaling_factor=float(_attr(attrs, "routed_scaling_factor")),
        fp32_logits=True,
    )


FAMILY_GATES = {
    "mixtral": lambda attrs: _softmax_family(attrs, normalize=True, cast_back=False),
    "qwen2_moe": _softmax_family,
    "qwen3_moe": _softmax_family,
    "olmoe": _softmax_family,
    "deepseek_v3": _deepseek,
    "gpt_oss": lambda attrs: GateSpec("topk_softmax", _attr(attrs, "num_experts_per_tok")),
}


def gate_spec(model_type: str, attrs: Mapping) -> GateSpec:
    """A family's gate from its config's plain attribute values (e.g. `config.to_dict()`)."""
    if model_type not in FAMILY_GATES:
        raise ValueError(f"no gate for model type {model_type!r}; known: {', '.join(FAMILY_GATES)}")
    return FAMILY_GATES[model_type](attrs)


def _attr(attrs: Mapping, name: str):
    if attrs.get(name) is None:
        raise ValueError(f"config attribute {name!r} is missing; the gate needs it")
    return attrs[name]
