"""Expert worker slots: one placement-group bundle each, on distinct nodes where there are enough.

A slot keeps its bundle for the version's life; when its actor dies (or its node does), a new actor
takes the bundle, which Ray moves to a live node. The group and the workers are detached: they outlive the
controller, so a restarted controller adopts them by name instead of starting over. Workers whose controller is
gone for good free themselves (`experts.worker`).
"""

import functools
import logging
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import get_placement_group, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ServeConfig
from cluster.control import plan_store
from cluster.control.placement import packs_layers
from cluster.node_env import ACTOR_ENV
from experts.model_ref import ModelRef
from experts.worker import ExpertWorker, Owner
from protos.wire.unix_stream import FrameLimits

log = logging.getLogger(__name__)
NAMESPACE = "moecluster"
NODE_CHECK_S = 2.0  # how often a starting worker's node is checked for death
HEALTH_TIMEOUT_S = 10.0  # a worker that does not answer Ray's ping within this has missed one
MISSED_PINGS = 3  # in a row: a worker that missed this many is silent (one that is only slow, on a busy machine or
# while a new version loads beside it, is not: the routers' health model steers around it)


class PlacementError(RuntimeError):
    pass


def worker_name(scope: str, slot: int) -> str:
    return f"{scope}:expert-worker-{slot}"


def group_name(scope: str) -> str:
    return f"{scope}:expert-workers"


class WorkerSlots:
    def __init__(self, config: ServeConfig, model: ModelRef, scope: str, owner: tuple[str, str] | None,
                 adopt: bool = False):
        """`scope`: the version the workers belong to; `owner`: their controller's actor name and namespace.
        `adopt`: take over the version's existing placement group, if it has one, instead of a new one."""
        self.config, self.model, self.scope, self.owner = config, model, scope, owner
        self.key = plan_store.data_path_key(scope)
        self.bundle = _bundle(config)
        self.size = config.num_workers
        self.group = (adopt and _existing_group(group_name(scope))) or _place(
            self.bundle, self.size, config.startup_timeout_s, name=group_name(scope))
        self.adopted = adopt and self.group is not None
        self.actors: dict[int, object] = {}
        self.addresses: dict[int, str] = {}
        self.missed: dict[int, int] = {}  # slot -> pings missed in a row
        self.by_layer = packs_layers(config.placement, self.nodes())

    def nodes(self) -> list[str]:
        bundles = placement_group_table(self.group)["bundles_to_node_id"]
        return [bundles.get(slot, f"pending-{slot}") for slot in range(self.size)]

    def start(self, plan: list[list[tuple[int, int]]]) -> None:
        for slot in range(self.size):  # a worker left by an earlier life of the application holds its name
            _kill_named(worker_name(self.scope, slot))
        failed = self.replace(range(self.size), plan)
        if failed:
            self.shutdown()
            raise PlacementError(f"expert workers failed to start: {failed}")

    def adopt(self, plan: list[list[tuple[int, int]]]) -> None:
        """Take over the workers still alive under their names, hosting what `plan` says; the others stay vacant."""
        for slot in range(self.size):
            try:
                actor = ray.get_actor(worker_name(self.scope, slot), namespace=NAMESPACE)
                hosted = set(map(tuple, ray.get(actor.stats.remote(), timeout=HEALTH_TIMEOUT_S)["pairs"]))
                want = set(plan[slot])
                ray.get([actor.load.remote(sorted(want - hosted)), actor.unload.remote(sorted(hosted - want))],
                        timeout=self.config.startup_timeout_s)
                self.addresses[slot] = ray.get(actor.address.remote(), timeout=HEALTH_TIMEOUT_S)
                self.actors[slot] = actor
            except (ValueError, RayActorError, GetTimeoutError) as error:
                log.warning("expert worker %d could not be adopted (%s); it will be replaced", slot, error)

    def vacant(self) -> list[int]:
        return [slot for slot in range(self.size) if slot not in self.actors]

    def replace(self, slots, plan: list[list[tuple[int, int]]]) -> dict[int, str]:
        """New workers in `slots`, loading their share of `plan`; returns why each one that failed did."""
        for slot in slots:
            self.actors[slot] = self._spawn(slot, plan[slot])
        nodes = self.nodes()  # where each new worker's bundle is as it starts
        refs = {slot: self.actors[slot].address.remote() for slot in slots}
        deadline = time.monotonic() + self.config.startup_timeout_s
        failed = {}
        for slot, ref in refs.items():
            try:
                self.addresses[slot] = _started(ref, nodes[slot], deadline)
            except (RayActorError, GetTimeoutError, PlacementError) as error:
                failed[slot] = _first_line(error)
                self.forget([slot])
        return failed

    def _spawn(self, slot: int, pairs: list[tuple[int, int]]):
        dtype = None if self.config.dtype == "auto" else self.config.dtype
        return (
            ray.remote(ExpertWorker)
            .options(
                name=worker_name(self.scope, slot), namespace=NAMESPACE, lifetime="detached", max_concurrency=4,
                num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0),
                runtime_env={"env_vars": ACTOR_ENV},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=slot),
            )
            .remote(self.model, pairs, dtype, self.key, self.config.worker_threads, self._computing_at_once(slot),
                    FrameLimits.of(self.config.limits), self._owner())
        )

    def _owner(self) -> Owner | None:
        if self.owner is None:
            return None
        name, namespace = self.owner
        return Owner(name, namespace, functools.partial(free_version, self.scope, self.group))

    def _computing_at_once(self, slot: int) -> int:
        """Workers that compute at once on `slot`'s node, sharing its cores: one when layers are packed, every
        worker there when they spread."""
        nodes = self.nodes()
        return 1 if self.by_layer else nodes.count(nodes[slot])

    def call_each(self, method: str, args: list) -> None:
        """`actor.method(args[slot])` on every live slot with something to do, all at once."""
        refs = [getattr(self.actors[s], method).remote(a) for s, a in enumerate(args) if a and s in self.actors]
        ray.get(refs, timeout=self.config.startup_timeout_s)

    def _live(self) -> list[tuple[int, object]]:
        """(slot, actor) now: `status` reads the slots while the controller's watch thread replaces dead ones."""
        return list(self.actors.items())

    def live_addresses(self) -> dict[int, str]:
        addresses = dict(self.addresses)
        return {slot: addresses[slot] for slot, _ in self._live() if slot in addresses}

    def check(self) -> tuple[list[int], list[int]]:
        """(slots whose worker died, slots whose worker missed MISSED_PINGS pings in a row). A worker died when Ray
        has released its name, not merely when a call to it failed: a caller on a node Ray has taken for dead
        sees every call fail."""
        refs = {slot: actor.health.remote() for slot, actor in self._live()}
        died, silent = [], []
        for slot, ref in refs.items():
            try:
                ray.get(ref, timeout=HEALTH_TIMEOUT_S)
                self.missed.pop(slot, None)
                continue
            except RayActorError:
                if not _named(worker_name(self.scope, slot)):
                    died.append(slot)
                    continue
            except GetTimeoutError:
                pass
            self.missed[slot] = self.missed.get(slot, 0) + 1
            if self.missed[slot] >= MISSED_PINGS:
                silent.append(slot)
        return died, silent

    def forget(self, slots) -> None:
        for slot in slots:
            self.addresses.pop(slot, None)
            self.missed.pop(slot, None)
            if self.actors.pop(slot, None) is not None:
                _kill_named(worker_name(self.scope, slot))

    def stats(self) -> dict[int, dict]:
        refs = {slot: actor.stats.remote() for slot, actor in self._live()}
        out = {}
        for slot, ref in refs.items():
            try:
                out[slot] = {"alive": True, **ray.get(ref, timeout=HEALTH_TIMEOUT_S)}
            except (RayActorError, GetTimeoutError):
                out[slot] = {"alive": False}
        return out

    def shutdown(self) -> None:
        self.forget(list(self.actors))
        remove_placement_group(self.group)


def free_version(scope: str, group) -> None:
    """Everything a version holds: its saved records, and its placement group with the workers in it."""
    plan_store.delete(scope)
    remove_placement_group(group)


def _kill_named(name: str, timeout_s: float = 30.0) -> None:
    """Kill the actor called `name`, if any, and wait until its name is free for a successor."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            return
        time.sleep(0.1)


def _started(address_ref, node: str, deadline: float) -> str:
    """The address a new worker answers with once it has started. A worker bound for a node that dies before it
    starts is given up at once: Ray may keep it waiting on that node (a host cut off before Ray took it for dead),
    while the bundle moves to a live node that a new worker would start on."""
    while True:
        ready, _ = ray.wait([address_ref], timeout=max(0.0, min(NODE_CHECK_S, deadline - time.monotonic())))
        if ready:
            return ray.get(address_ref)
        if time.monotonic() >= deadline:
            raise GetTimeoutError("the worker did not start within startup_timeout_s")
        if any(n["NodeID"] == node and not n["Alive"] for n in ray.nodes()):
            raise PlacementError(f"its node {node[:12]} died before it started")


def _named(name: str) -> bool:
    """Whether an actor called `name` is alive, or being started, to Ray's control store."""
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def _existing_group(name: str):
    try:
        group = get_placement_group(name)
    except ValueError:
        return None
    return group if placement_group_table(group).get("state") != "REMOVED" else None


def _first_line(error: Exception) -> str:
    """The cause of an actor's failed start, without Ray's traceback."""
    cause = getattr(error, "cause", None) or error
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _bundle(config: ServeConfig) -> dict:
    bundle = {"CPU": config.worker_cpus}
    if ray.cluster_resources().get("GPU", 0) > 0 and config.worker_gpus > 0:
        bundle["GPU"] = config.worker_gpus
    return bundle


def worker_device(config: ServeConfig) -> str:
    """Where the workers will hold their experts: on a GPU where their bundle reserves one."""
    return "cuda" if "GPU" in _bundle(config) else "cpu"


def _place(bundle: dict, size: int, timeout_s: float, name: str = ""):
    """A placement group of `size` bundles; refused at once when the cluster can never hold it.

    A group of the same name can only be a dead controller's leftover: it is removed first.
    """
    if name:
        try:
            remove_placement_group(get_placement_group(name))
        except ValueError:
            pass
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    fitting = sum(min(int(r.get(k, 0) // v) for k, v in bundle.items()) for r in nodes)
    if fitting < size:
        raise PlacementError(
            f"the cluster can hold {fitting} expert workers of {bundle} but the plan needs {size}: "
            f"short by {size - fitting}; add nodes, or lower num_workers, worker_cpus or worker_gpus"
        )
    spread = sum(1 for r in nodes if all(r.get(k, 0) >= v for k, v in bundle.items()))
    strategy = "STRICT_SPREAD" if spread >= size > 1 else "SPREAD"
    group = placement_group([bundle] * size, strategy=strategy, name=name, lifetime="detached")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise PlacementError(
            f"{size} expert workers of {bundle} ({strategy}) were not placed within {timeout_s:.0f}s: "
            f"the cluster has {ray.available_resources()} free"
        )
    return group
