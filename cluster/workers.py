"""Expert workers as Ray actors, one placement-group bundle each, on distinct nodes where there are enough."""

import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ServeConfig
from experts.worker import ExpertWorker


class PlacementError(RuntimeError):
    pass


class WorkerGroup:
    def __init__(self, actors: list, addresses: list[str], group):
        self.actors, self.addresses, self._group = actors, addresses, group

    def stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self._group)


def _bundle(config: ServeConfig) -> dict:
    bundle = {"CPU": config.worker_cpus}
    if ray.cluster_resources().get("GPU", 0) > 0 and config.worker_gpus > 0:
        bundle["GPU"] = config.worker_gpus
    return bundle


NAMESPACE = "moecluster"


def worker_name(app: str, index: int) -> str:
    return f"{app}:expert-worker-{index}"


def start_workers(config: ServeConfig, model_dir: str, plan: list[list[tuple[int, int]]], app: str) -> WorkerGroup:
    bundle = _bundle(config)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    strategy = "STRICT_SPREAD" if len(nodes) >= len(plan) > 1 else "SPREAD"
    group = placement_group([bundle] * len(plan), strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=config.startup_timeout_s)
    if not ready:
        remove_placement_group(group)
        raise PlacementError(
            f"could not place {len(plan)} expert workers of {bundle} each ({strategy}) within "
            f"{config.startup_timeout_s:.0f}s; the cluster has {ray.available_resources()} available"
        )
    threads = config.worker_threads or max(1, (os.cpu_count() or 1) // len(plan))
    actors = [
        ray.remote(ExpertWorker)
        .options(
            name=worker_name(app, i), namespace=NAMESPACE, num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
        )
        .remote(model_dir, pairs, None if config.dtype == "auto" else config.dtype, threads)
        for i, pairs in enumerate(plan)
    ]
    addresses = ray.get([a.address.remote() for a in actors], timeout=config.startup_timeout_s)
    return WorkerGroup(actors, addresses, group)
