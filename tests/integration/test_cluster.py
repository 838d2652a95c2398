"""Issue-3 behaviour on a simulated multi-node cluster: placement on distinct nodes, live scaling,
rebalancing by load, and failover of a worker and of a node, all while requests stream."""

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from ray import serve

from cluster.control import ops
from cluster.control.workers import NAMESPACE, PlacementError, _place, worker_name
from cluster.config import ServeConfig
from cluster.serving.app import application
from tests.integration.conftest import HEAD, generate, tokens

APP = "multi"
PROMPTS = [f"stream {i}: mixture of experts" for i in range(8)]


@pytest.fixture(scope="module")
def app(ray_cluster, checkpoints, serve_endpoints):
    config = ServeConfig(model=str(checkpoints["mixtral"]), model_name=APP, num_workers=3, default_replicas=2,
                         expert_replicas={"0:3": 1}, dtype="float32")
    # the serving replica on the head, so that a worker's node without one is there to remove
    serve.run(application(config, ray_actor_options={"resources": {HEAD: 1}}), name=APP, route_prefix=f"/{APP}")
    yield ray_cluster
    serve.delete(APP)


@pytest.fixture(scope="module")
def expected(app, inference_stub):
    """The fault-free, unscaled outputs of the 8 streams."""
    return run_streams(inference_stub)


def run_streams(stub, during=None, max_tokens=24):
    """8 concurrent greedy streams; `during()` runs once they are under way. Returns their tokens."""
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(generate, stub, APP, prompt=p, max_tokens=max_tokens, temperature=0, timeout=300)
                   for p in PROMPTS]
        if during:
            time.sleep(0.5)
            during()
        return [tokens(f.result()) for f in futures]


def wait_until(condition, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_workers_land_on_distinct_nodes_and_status_shows_it(app):
    status = ops.status(APP)
    nodes = [w["node_id"] for w in status["workers"]]
    assert len(set(nodes)) == 3 and all(w["alive"] for w in status["workers"])
    assert {n["node_id"] for n in status["nodes"] if n["alive"]} >= set(nodes)
    assert status["replica_counts"]["0:3"] == 1 and status["replica_counts"]["0:4"] == 2
    assert all(w["resident_bytes"] > w["weight_bytes"] > 0 for w in status["workers"])
    assert "RESIDENT" in ops.format_status(status)


def test_scale_an_expert_1_3_1_while_streams_generate(app, inference_stub, expected):
    def scale_up_then_down():
        assert ops.scale({"0:3": 3}, APP)["replica_counts"]["0:3"] == 3
        assert ops.scale({"0:3": 1}, APP)["replica_counts"]["0:3"] == 1

    assert run_streams(inference_stub, during=scale_up_then_down) == expected
    hosts = [w for w in ops.status(APP)["workers"] if "0:3" in w["replicas"]]
    assert len(hosts) == 1


def test_killed_worker_is_routed_around_and_replaced(app, inference_stub, expected):
    ops.scale({"0:3": 2}, APP)  # every expert has a second replica to fail over to
    victim = ray.get_actor(worker_name(ops.status(APP)["scope"], 1), namespace=NAMESPACE)
    assert run_streams(inference_stub, during=lambda: ray.kill(victim)) == expected
    wait_until(lambda: all(w["alive"] for w in ops.status(APP)["workers"]), what="the worker to come back")
    status = ops.status(APP)
    assert sum(len(w["replicas"]) for w in status["workers"]) == sum(status["replica_counts"].values())


def test_removed_node_is_routed_around_and_its_workers_replaced(app, inference_stub, expected):
    status = ops.status(APP)
    serving = {status["controller_node_id"], *(r["node_id"] for r in status["routers"])}
    removable = {n.node_id: n for n in app.worker_nodes if n.node_id not in serving}  # the fault is an expert node's
    node_id = next(w["node_id"] for w in status["workers"] if w["node_id"] in removable)
    node = removable[node_id]
    try:
        outputs = run_streams(inference_stub, during=lambda: app.remove_node(node))
        assert outputs == expected, ops.format_status(status)
        wait_until(lambda: all(w["alive"] for w in ops.status(APP)["workers"]), what="workers on a live node")
        after = ops.status(APP)
        assert node_id not in [w["node_id"] for w in after["workers"]]
        assert len({w["node_id"] for w in after["workers"]}) == 3
    finally:
        app.add_node(num_cpus=2)
        app.wait_for_nodes()


def test_rebalance_lowers_max_over_mean_tokens_per_worker(app, inference_stub):
    skewed = [" the" * 40, " of" * 40, " the" * 39, " of" * 38]

    def traffic():
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: generate(inference_stub, APP, prompt=p, max_tokens=4, temperature=0), skewed))
        time.sleep(1.0)  # let the routers report

    ops.scale({f"{layer}:{e}": 1 for layer in (0, 1) for e in range(8)}, APP)  # one replica each, as a start
    traffic()
    before = ops.balance(ops.status(APP))
    result = ops.rebalance(APP)
    hot = max(result["tokens_per_expert"], key=result["tokens_per_expert"].get)
    assert result["replica_counts"][hot] > 1
    traffic()
    after = ops.balance(ops.status(APP))
    assert 0 < after < before, (before, after)


def test_plan_that_cannot_fit_is_refused_at_once(app):
    started = time.monotonic()
    with pytest.raises(PlacementError, match="short by"):
        _place({"CPU": 1.0}, 50, timeout_s=600)
    assert time.monotonic() - started < 5


def test_a_worker_whose_node_lacks_the_checkpoint_fails_to_start_naming_the_node_and_path(app, checkpoints,
                                                                                            tmp_path):
    from cluster.control.workers import _first_line
    from experts.model_ref import ModelRef
    from experts.worker import ExpertWorker

    ref = ModelRef(str(tmp_path / "gone"), ModelRef.here(str(checkpoints["mixtral"])).fingerprint)
    worker = ray.remote(ExpertWorker).options(num_cpus=0).remote(ref, [(0, 0)], "float32", "key")
    with pytest.raises(ray.exceptions.RayActorError) as failed:
        ray.get(worker.address.remote(), timeout=120)
    assert re.search(rf"node [\d.]+: no checkpoint at {tmp_path / 'gone'} ", _first_line(failed.value))
