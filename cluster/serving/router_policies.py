"""The serving config's routing, hedging and deadline fields as the router's policies."""

from cluster.config import HedgeConfig, RoutingConfig, ServeConfig
from router.deadline import CallDeadlines
from router.hedge import HedgePolicy
from router.routing import centroids_path, load_centroids, policy_for_model


def routing_policy(model, model_dir: str, routing: RoutingConfig):
    centroids = None
    if routing.policy == "kmeans":
        centroids = load_centroids(centroids_path(model_dir, routing.centroids))
    return policy_for_model(model, routing.policy, hash_seed=routing.hash_seed,
                            capacity_factor=routing.capacity_factor, overflow=routing.overflow, centroids=centroids)


def hedge_policy(config: HedgeConfig) -> HedgePolicy | None:
    if not config.enabled:
        return None
    return HedgePolicy(factor=config.factor, min_s=config.min_ms / 1e3, budget=config.budget)


def call_deadlines(config: ServeConfig) -> CallDeadlines | None:
    deadline = config.call_deadline
    if not deadline.enabled:
        return None
    return CallDeadlines(config.expert_timeout_s, factor=deadline.factor, floor_s=deadline.floor_ms / 1e3)
