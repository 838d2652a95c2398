"""The fault matrix: real processes killed, stopped, slowed and starved while 8 greedy streams generate, on the
simulated multi-node cluster with 2 Serve replicas sharing one controller and 3 expert workers.

Every request either completes with exactly the fault-free tokens or fails with a status code; with 2 replicas of
every expert, no single worker fault fails a request. Each test records what its fault cost (`faults.MATRIX`).
"""

import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
from ray import serve

from cluster.config import ServeConfig
from cluster.control import ops
from cluster.control.workers import NAMESPACE, worker_name
from cluster.node_env import ACTOR_ENV
from cluster.serving.app import application
from tests.integration import faults
from tests.integration.conftest import HEAD, generate, tokens

APP = "faults"
PROMPTS = [f"fault {i}: experts keep serving" for i in range(8)]
DEADLINE_S = 1.0
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir(checkpoints, tmp_path_factory):
    """A copy of the checkpoint of its own, so one test can make its files unreadable."""
    return shutil.copytree(checkpoints["mixtral"], tmp_path_factory.mktemp("faults") / "mixtral")


@pytest.fixture(scope="module")
def app(ray_cluster, model_dir, serve_endpoints, inference_stub):
    config = ServeConfig(model=str(model_dir), model_name=APP, num_workers=3, default_replicas=2,
                         expert_timeout_s=DEADLINE_S, dtype="float32", num_replicas=2)
    on_head = {"num_cpus": 1, "resources": {HEAD: 1}, "runtime_env": {"env_vars": ACTOR_ENV}}  # node faults spare it
    serve.run(application(config, ray_actor_options=on_head), name=APP, route_prefix=f"/{APP}")
    wait_until(lambda: len(ops.status(APP)["routers"]) == 2, what="both Serve replicas to check in")
    yield ray_cluster
    # The session's gRPC channel may still hold a connection to a proxy these tests killed (or whose node they
    # removed): let it find a live one before the next module uses it.
    wait_until(lambda: all(isinstance(one_request(inference_stub, PROMPTS[0], timeout=30), list) for _ in range(3)),
               what="the session's channel to serve again")
    serve.delete(APP)


@pytest.fixture(scope="module")
def expected(app, inference_stub):
    outputs = [one_request(inference_stub, p) for p in PROMPTS]
    assert all(isinstance(out, list) for out in outputs), outputs
    return dict(zip(PROMPTS, outputs))


def one_request(stub, prompt: str, timeout: float = 120):
    """The request's greedy tokens, or its error as "CODE: details"."""
    try:
        return tokens(generate(stub, APP, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, timeout=timeout))
    except grpc.RpcError as error:
        return f"{error.code().name}: {error.details()}"


def run_streams(stub, during=None, back=None):
    """8 closed-loop streams, each sending its request again as soon as one ends, while `during()` (started once
    they are under way) and then `back()` run; at least one request each.

    Returns (prompt, tokens or error) per request, and the seconds `back()` took: the time from the fault's end
    to full capacity, under load."""
    done, back_s = threading.Event(), None

    def stream(prompt):
        outcomes = [(prompt, one_request(stub, prompt))]
        while not done.is_set():
            outcomes.append((prompt, one_request(stub, prompt)))
            if isinstance(outcomes[-1][1], str):
                time.sleep(0.1)  # a client backs off before it tries again
        return outcomes

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(stream, p) for p in PROMPTS]
        try:
            if during:
                time.sleep(0.5)
                during()
            if back:
                back_s = wait_until(back, what="full capacity")
        finally:
            done.set()
        return [outcome for f in futures for outcome in f.result()], back_s


def wait_until(condition, timeout=90, what="condition", interval=0.1) -> float:
    """Seconds until `condition()` held."""
    started = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except (ray.exceptions.RayError, LookupError):
            pass  # the controller is restarting
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        time.sleep(interval)


def full_capacity() -> bool:
    status = ops.status(APP)
    workers = status["workers"]
    return (all(w["alive"] for w in workers) and not status["ejected_workers"] and len(status["routers"]) == 2
            and sum(len(w["replicas"]) for w in workers) == sum(status["replica_counts"].values()))


def check(fault: str, stub, expected, during, replicas=2, back=full_capacity, note="") -> tuple[faults.Row, list[str]]:
    """Run the streams under `during`, wait for `back()`, record and return the row and the errors."""
    outcomes, recovery_s = run_streams(stub, during, back)
    return record(fault, replicas, outcomes, expected, recovery_s, note)


def record(fault, replicas, outcomes, expected, recovery_s, note=""):
    errors = [out for _, out in outcomes if isinstance(out, str)]
    wrong = [(p, out) for p, out in outcomes if isinstance(out, list) and out != expected[p]]
    row = faults.Row(fault, replicas, len(outcomes), len(errors), len(wrong), recovery_s, note)
    faults.MATRIX.append(row)
    assert not wrong, wrong
    return row, errors


def first_stream_exact(stub, expected) -> bool:
    return one_request(stub, PROMPTS[0], timeout=30) == expected[PROMPTS[0]]


def worker_pid(slot: int) -> int:
    return ops.status(APP)["workers"][slot]["pid"]


def test_one_scrape_shows_both_serving_replicas(app, serve_endpoints, expected):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    def replicas_seen() -> set[str]:
        text = httpx.get(f"{serve_endpoints[0]}/{APP}/metrics", timeout=30).text
        return {sample.labels["replica"] for family in text_string_to_metric_families(text)
                if family.name == "moecluster_num_requests_running" for sample in family.samples}

    wait_until(lambda: len(replicas_seen()) == 2, what="a scrape to show both replicas")
    assert {router["router"] for router in ops.status(APP)["routers"]} == replicas_seen()


def test_worker_sigkill(app, inference_stub, expected):
    pid = worker_pid(1)
    _, errors = check("worker SIGKILL", inference_stub, expected, lambda: os.kill(pid, signal.SIGKILL))
    assert not errors
    assert ops.status(APP)["health"]["replacements"] >= 1


def test_worker_stopped_shorter_than_the_deadline(app, inference_stub, expected):
    pid = worker_pid(0)
    _, errors = check(f"worker SIGSTOP {DEADLINE_S / 2:.1f}s (deadline {DEADLINE_S:.0f}s)", inference_stub, expected,
                        lambda: faults.stall(pid, DEADLINE_S / 2))
    assert not errors


def test_worker_stopped_longer_than_the_deadline_is_readmitted(app, inference_stub, expected):
    before, pid = ops.status(APP)["health"], worker_pid(2)
    row, errors = check("worker SIGSTOP 4s", inference_stub, expected, lambda: faults.stall(pid, 4.0))
    assert not errors
    assert row.recovery_s <= 2.0  # back within 2 s of SIGCONT
    after = ops.status(APP)["health"]
    assert after["ejections"] > before["ejections"] and after["readmissions"] > before["readmissions"]
    assert after["replacements"] == before["replacements"]  # stalled, not gone: not replaced


def test_slow_worker_on_a_duty_cycle(app, inference_stub, expected):
    pid = worker_pid(1)
    _, errors = check("worker stopped 0.6s / running 0.6s, 5 cycles", inference_stub, expected,
                        lambda: faults.duty_cycle(pid, 0.6, 0.6, 5))
    assert not errors


def test_worker_answering_malformed_replies(app, inference_stub, expected):
    worker = ray.get_actor(worker_name(ops.status(APP)["scope"], 0), namespace=NAMESPACE)

    def corrupt_for_a_while():
        ray.get(worker.inject_fault.remote(True))
        time.sleep(3.0)
        ray.get(worker.inject_fault.remote(False))

    _, errors = check("worker replies malformed for 3s", inference_stub, expected, corrupt_for_a_while)
    assert not errors


def test_controller_sigkill(app, inference_stub, expected):
    pid = ops.status(APP)["controller_pid"]
    killed = {}

    def kill():
        os.kill(pid, signal.SIGKILL)
        killed["at"] = time.monotonic()
        wait_until(lambda: ops.status(APP)["controller_pid"] != pid, timeout=30, what="status from a new controller")
        killed["status_s"] = time.monotonic() - killed["at"]
        assert ops.scale({"0:3": 2}, APP)["replica_counts"]["0:3"] == 2
        killed["scale_s"] = time.monotonic() - killed["at"]

    row, errors = check("controller SIGKILL", inference_stub, expected, kill)
    row.note = f"status again after {killed['status_s']:.1f}s, scale after {killed['scale_s']:.1f}s"
    assert not errors
    assert killed["scale_s"] < 30


def test_replacement_with_unreadable_checkpoint_keeps_old_replicas_serving(app, inference_stub, expected, model_dir):
    hidden = model_dir.parent / "hidden"
    hidden.mkdir(exist_ok=True)
    files = sorted(model_dir.glob("*.safetensors"))

    def break_then_kill():
        for f in files:
            f.rename(hidden / f.name)
        os.kill(worker_pid(1), signal.SIGKILL)
        wait_until(lambda: ops.status(APP)["replacement_error"], what="the replacement to fail")
        assert f"the checkpoint at {model_dir} differs" in ops.status(APP)["replacement_error"]

    def restore():
        for f in files:
            (hidden / f.name).rename(f)

    try:
        outcomes, _ = run_streams(inference_stub, break_then_kill)
    finally:
        restore()
    outcomes_after, recovery_s = run_streams(inference_stub, back=full_capacity)
    assert not ops.status(APP)["replacement_error"]
    _, errors = record("replacement worker's checkpoint unreadable", 2, outcomes + outcomes_after, expected,
                         recovery_s)
    assert not errors  # the surviving replicas served every request


def replaced(title: str, count: int, killed: list[int]):
    """A condition: `count` processes titled `title`, none of them one that was `killed`, and full capacity."""
    def condition():
        pids = faults.pids_titled(title)
        return len(pids) == count and not set(killed) & set(pids) and full_capacity()
    return condition


def test_serve_replica_sigkill(app, inference_stub, expected):
    title = f"ray::ServeReplica:{APP}:"
    replicas = faults.pids_titled(title)
    assert len(replicas) == 2, replicas
    _, errors = check("Serve replica SIGKILL (of 2)", inference_stub, expected,
                        lambda: os.kill(replicas[0], signal.SIGKILL), back=replaced(title, 2, replicas[:1]),
                        note="requests in flight on the killed replica fail; the restarted one re-attaches")
    assert all(e.startswith(("UNAVAILABLE", "INTERNAL", "CANCELLED", "UNKNOWN")) for e in errors), errors


def test_serve_proxies_sigkill(app, inference_stub, expected):
    proxies = faults.pids_titled("ray::ProxyActor")

    def kill_all():
        for pid in proxies:
            os.kill(pid, signal.SIGKILL)

    restarted = replaced("ray::ProxyActor", len(proxies), proxies)
    check("every Serve proxy SIGKILL", inference_stub, expected, kill_all,
          back=lambda: restarted() and first_stream_exact(inference_stub, expected),
          note="requests fail until Serve has restarted a proxy (clients retry every 0.1 s)")


def test_one_replica_stall_fails_fast_and_serves_again_soon_after(app, inference_stub, expected):
    experts = list(ops.status(APP)["replica_counts"])
    ops.scale(dict.fromkeys(experts, 1), APP)
    try:
        resumed = {}

        def stall():
            faults.stall(worker_pid(0), 4.0)
            resumed["at"] = time.monotonic()

        outcomes, _ = run_streams(inference_stub, stall)
        wait_until(lambda: first_stream_exact(inference_stub, expected), what="exact serving")
        back_s = time.monotonic() - resumed["at"]
        _, errors = record("worker SIGSTOP 4s", 1, outcomes, expected, back_s)
        assert errors and all(e.startswith("UNAVAILABLE") and "layer" in e and "expert" in e for e in errors), errors
        assert back_s < 5.0
    finally:
        ops.scale(dict.fromkeys(experts, 2), APP)


def test_node_removed(app, inference_stub, expected):
    status = ops.status(APP)
    serving = {status["controller_node_id"], *(r["node_id"] for r in status["routers"])}
    removable = {n.node_id: n for n in app.worker_nodes if n.node_id not in serving}
    node_id = next(w["node_id"] for w in status["workers"] if w["node_id"] in removable)
    node = removable[node_id]
    try:
        _, errors = check("node removed", inference_stub, expected, lambda: app.remove_node(node))
        assert not errors
    finally:
        app.add_node(num_cpus=2)
        app.wait_for_nodes()


def test_replica_dead_without_graceful_shutdown_leaves_no_orphans(app, model_dir):
    """Its replica SIGKILLed, the application deleted: Serve stops the version's controller, and its workers, seeing
    their controller gone, free themselves, their placement group and the version's saved plan."""
    from ray.util.placement_group import placement_group_table

    from cluster.control import plan_store
    from cluster.control.workers import group_name

    name = "orphan"
    config = ServeConfig(model=str(model_dir), model_name=name, num_workers=1, dtype="float32")
    serve.run(application(config, ray_actor_options={"num_cpus": 1, "resources": {HEAD: 1}}),
              name=name, route_prefix=f"/{name}")
    scope = ops.status(name)["scope"]
    for pid in faults.pids_titled(f"ray::ServeReplica:{name}:"):
        os.kill(pid, signal.SIGKILL)
    serve.delete(name, _blocking=False)

    def gone() -> bool:
        groups = [g for g in placement_group_table().values() if g["name"] == group_name(scope)]
        return (all(g["state"] == "REMOVED" for g in groups) and not ops.controllers(name)
                and plan_store.load(scope) is None)

    wait_until(gone, timeout=120, what="the orphaned workers, placement group and plan to be freed")
    with pytest.raises(ValueError):
        ray.get_actor(worker_name(scope, 0), namespace=NAMESPACE)
