"""A deployment's routing policy, applied after the model's own gate. Pure torch.

T = tokens, K = experts per token, E = experts, D = hidden
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from router.gating import GateSpec, gate_logits, gate_spec
from router.policies import apply_capacity, balanced_route, capacity_for, hash_route, kmeans_route

CENTROIDS_FILE = "moecluster-centroids.safetensors"


class RoutingPolicy:
    """`model` keeps the checkpoint's own choice; `hash`, `balanced` and `kmeans` replace it; a capacity factor
    caps any of them per batch."""

    def __init__(self, name: str = "model", spec: GateSpec | None = None, gates: dict | None = None,
                 centroids: dict[int, torch.Tensor] | None = None, hash_seed: int = 0,
                 capacity_factor: float | None = None, overflow: str = "reroute"):
        self.name, self.spec, self.gates = name, spec, gates or {}
        self.centroids, self.hash_seed = centroids or {}, hash_seed
        self.capacity_factor, self.overflow = capacity_factor, overflow

    @property
    def is_model_gate(self) -> bool:
        return self.name == "model" and self.capacity_factor is None

    def route(self, layer: int, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
              token_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's (index [T, K], weights [T, K]) in, this policy's out."""
        if self.is_model_gate:
            return index, weights
        weight, bias = self.gates[layer]
        logits = gate_logits(self.spec, hidden, weight, bias).float()  # [T, E]
        tokens, top_k = index.shape
        capacity = capacity_for(tokens, top_k, weight.shape[0], self.capacity_factor) if self.capacity_factor else None
        if self.name == "balanced":
            return balanced_route(logits, top_k, max(capacity or 0, -(-tokens * top_k // weight.shape[0])))
        if self.name == "hash":
            if token_ids is None or token_ids.numel() != tokens:
                raise ValueError("the hash policy needs the token id of every row")
            index, weights = hash_route(token_ids, weight.shape[0], top_k, self.hash_seed)
        elif self.name == "kmeans":
            index, weights = kmeans_route(hidden.float(), self.centroids[layer], top_k)
        if capacity is None:
            return index, weights
        index, keep = apply_capacity(index, logits.softmax(-1), capacity, self.overflow)
        return index, weights * keep  # a dropped pair weighs 0: the token's residual passes through


def policy_for_model(model, name: str, *, hash_seed: int = 0, capacity_factor: float | None = None,
                     overflow: str = "reroute", centroids: dict[int, torch.Tensor] | None = None) -> RoutingPolicy:
    from experts.layout import experts_paths

    gates = {}
    for layer, path in experts_paths(model).items():
        block = model.get_submodule(path.rpartition(".")[0])
        gate = block.gate if hasattr(block, "gate") else block.router
        gates[layer] = (gate.weight, getattr(gate, "bias", None))
    if name == "kmeans" and set(gates) - set(centroids or {}):
        raise ValueError(f"the kmeans policy needs centroids for layers {sorted(set(gates) - set(centroids or {}))}")
    spec = gate_spec(model.config.model_type, model.config.to_dict())
    return RoutingPolicy(name, spec, gates, centroids, hash_seed, capacity_factor, overflow)


def centroids_path(model_dir, path: str | None = None) -> Path:
    return Path(path) if path else Path(model_dir) / CENTROIDS_FILE


def save_centroids(path, centroids: dict[int, torch.Tensor]) -> None:
    save_file({f"layer.{layer}": c.contiguous() for layer, c in centroids.items()}, str(path))


def load_centroids(path) -> dict[int, torch.Tensor]:
    if not Path(path).exists():
        raise FileNotFoundError(f"no k-means centroids at {path}: run `moecluster calibrate --model DIR` first")
    return {int(name.split(".")[1]): tensor.float() for name, tensor in load_file(str(path)).items()}
