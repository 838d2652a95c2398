"""The routing table: which worker hosts each expert's replicas, and where to reach it."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RoutingTable:
    version: int
    addresses: dict[int, str]  # worker -> gRPC address
    replicas: dict[int, list[list[int]]] = field(default_factory=dict)  # layer -> per expert, workers hosting it

    @classmethod
    def from_plan(cls, version: int, plan: list[list[tuple[int, int]]], addresses: dict[int, str],
                  moe_shape: dict[int, int]) -> "RoutingTable":
        replicas = {layer: [[] for _ in range(n)] for layer, n in moe_shape.items()}
        for worker, pairs in enumerate(plan):
            if worker in addresses:
                for layer, expert in pairs:
                    replicas[layer][expert].append(worker)
        return cls(version, dict(addresses), replicas)
