"""How Serve rolls a new version out, and scales the serving replicas: options derived from the serving config."""

import logging

import ray

from cluster.config import AutoscalingConfig, ServeConfig

log = logging.getLogger(__name__)
REPLICA_CPUS = 1  # each serving replica's (MoEServer's ray_actor_options)


def autoscaling_options(config: AutoscalingConfig) -> dict:
    """Serve's autoscaling_config for the serving replicas."""
    return config.model_dump()


def rollout_surge(config: ServeConfig) -> int:
    """Serve's max_surge_percent: 100 where the cluster has room for a whole new version (its expert workers and
    serving replicas) beside the running one, so the old version serves until the new one is ready; else 0, so
    the old version stops first and the rollout still completes, with a pause in serving."""
    if not ray.is_initialized():
        return 100
    need = {"CPU": config.num_workers * config.worker_cpus + config.most_serving_replicas() * REPLICA_CPUS}
    free = ray.available_resources()
    gpus = config.num_workers * config.worker_gpus + config.most_serving_replicas() * config.serving_gpus
    if ray.cluster_resources().get("GPU", 0) > 0 and gpus > 0:
        need["GPU"] = gpus
    if all(free.get(name, 0) >= amount for name, amount in need.items()):
        return 100
    log.warning("no room for a new version beside a running one (it needs %s, the cluster has %s free): a "
                "rollout stops the running version first, and serving pauses until the new one is up", need,
                {name: free.get(name, 0) for name in need})
    return 0
