"""The routing table: which worker hosts each expert's replicas, and where to reach it."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RoutingTable:
    version: int
    addresses: dict[int, str]  # worker -> gRPC address
    replicas: dict[int, list[list[int]]] = field(default_factory=dict)  # layer -> per expert, workers hosting it
    gone: frozenset[int] = frozenset()  # workers of the plan that are dead and not yet replaced
    hedgeable: frozenset[int] = field(init=False)  # layers where some expert has 2 or more replicas
    replicated: frozenset[int] = field(init=False)  # layers where every expert has 2 or more replicas

    def __post_init__(self):
        hosts_of = self.replicas.items()
        object.__setattr__(self, "hedgeable", frozenset(l for l, hosts in hosts_of if any(len(w) > 1 for w in hosts)))
        object.__setattr__(self, "replicated", frozenset(l for l, hosts in hosts_of if all(len(w) > 1 for w in hosts)))

    @classmethod
    def from_plan(cls, version: int, plan: list[list[tuple[int, int]]], addresses: dict[int, str],
                  moe_shape: dict[int, int]) -> "RoutingTable":
        replicas = {layer: [[] for _ in range(n)] for layer, n in moe_shape.items()}
        for worker, pairs in enumerate(plan):
            if worker in addresses:
                for layer, expert in pairs:
                    replicas[layer][expert].append(worker)
        gone = frozenset(w for w, pairs in enumerate(plan) if pairs and w not in addresses)
        return cls(version, dict(addresses), replicas, gone)
