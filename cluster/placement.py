"""Placement plans: which worker hosts which (layer, expert). Pure Python, no Ray."""


def plan_placement(moe_shape: dict[int, int], num_workers: int) -> list[list[tuple[int, int]]]:
    """Deal every layer's experts round-robin over the workers, so each layer fans out to all of them.

    moe_shape: {layer: number of routed experts}. Returns, per worker, its (layer, expert) pairs.
    """
    if num_workers < 1:
        raise ValueError("num_workers must be at least 1")
    plan: list[list[tuple[int, int]]] = [[] for _ in range(num_workers)]
    for layer, experts in sorted(moe_shape.items()):
        for expert in range(experts):
            plan[(layer + expert) % num_workers].append((layer, expert))
    return plan


def expert_owner(plan: list[list[tuple[int, int]]]) -> dict[tuple[int, int], int]:
    return {pair: worker for worker, pairs in enumerate(plan) for pair in pairs}
