"""The cross-host fault matrix: faults of real hosts under load, each measured the same way.

    python -m tests.host_matrix [--rows port,one_way,...] [--engine vllm] [--json-out matrix.json]

Three hosts (tests/hosts.py), one expert worker on each, the serving replica on the head's host, default settings
in float32. Eight closed-loop greedy streams run through each fault and until the cluster is back at full capacity.
Each row gives the requests, the failed ones, the wrong tokens (against a fault-free run), the slowest request the
fault touched, and the seconds from the fault's end to full capacity. tests/integration/test_hosts.py runs it in CI.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.hosts import HEAD_IP, SERVING, Hosts, host_cluster

PROMPTS = [f"host {i}: experts keep serving" for i in range(8)]
MAX_TOKENS = 16
GRPC_PORT = 9300
NODE_VERDICT_S = 10.0  # Ray's health-check timeout: the least time in which Ray may still take a node for dead


@dataclass(frozen=True)
class Victim:
    host: str
    worker: int
    port: int  # its data-path (gRPC) port


@dataclass(frozen=True)
class Fault:
    what: str
    hold_s: float  # from the fault's start to its end
    start: Callable[[Hosts, Victim], None]
    end: Callable[[Hosts, Victim], None] = lambda hosts, victim: None
    replicas: int = 2  # of every expert
    on_controller_host: bool = False  # the victim is the host the expert controller runs on (else one without it)
    during: Callable[[str], dict] | None = None  # an operation on the application while the fault holds


def _scale_up(app: str) -> dict:
    from cluster.control import ops

    started = time.monotonic()
    try:
        ops.scale({"0:0": 3, "1:1": 3}, app)
        return {"scale_s": round(time.monotonic() - started, 2)}
    except Exception as error:  # what an operator would see
        return {"scale_s": round(time.monotonic() - started, 2), "scale_error": str(error)[:300]}


FAULTS = {
    "port": Fault("a worker's data-path port blocked, its Ray node healthy", 10.0,
                  lambda h, v: h.drop(v.host, ["-p", "tcp", "--dport", str(v.port)]),
                  lambda h, v: h.undrop(v.host, ["-p", "tcp", "--dport", str(v.port)])),
    "one_way": Fault("router -> worker packets dropped, the reverse flowing", 10.0,
                     lambda h, v: h.drop(v.host, ["-s", HEAD_IP]), lambda h, v: h.undrop(v.host, ["-s", HEAD_IP])),
    "scale": Fault("a worker's host cut off and restored while experts are scaled up", 10.0,
                   lambda h, v: h.cut(v.host), lambda h, v: h.restore(v.host), during=_scale_up),
    "killed": Fault("a worker's host loses every process (its supervisor starts the node again)", 0.0,
                    lambda h, v: h.kill(v.host)),
    "cut": Fault("a worker's host cut off for 30 s (Ray takes it for dead)", 30.0,
                 lambda h, v: h.cut(v.host), lambda h, v: h.restore(v.host)),
    "controller": Fault("the expert controller's host cut off for 30 s", 30.0,
                        lambda h, v: h.cut(v.host), lambda h, v: h.restore(v.host), on_controller_host=True),
    "single": Fault("a worker's host cut off for 10 s, 1 replica of every expert", 10.0,
                    lambda h, v: h.cut(v.host), lambda h, v: h.restore(v.host), replicas=1),
}


@dataclass
class Outcome:
    prompt: str
    result: list[int] | str  # tokens, or "CODE: details"
    started: float
    ended: float


@dataclass
class Traffic:
    """Closed-loop greedy streams against one application over gRPC."""

    stub: object
    app: str
    expected: dict[str, list[int]] = field(default_factory=dict)

    def one(self, prompt: str) -> Outcome:
        import grpc

        from protos import inference_pb2

        started = time.monotonic()
        try:
            request = inference_pb2.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            result = [t for r in self.stub.Generate(request, timeout=60, metadata=[("application", self.app)])
                      for t in r.token_ids]
        except grpc.RpcError as error:
            result = f"{error.code().name}: {error.details()}"
        return Outcome(prompt, result, started, time.monotonic())

    @contextmanager
    def running(self):
        outcomes, done = [], threading.Event()

        def stream(prompt):
            while not done.is_set():
                outcomes.append(self.one(prompt))

        threads = [threading.Thread(target=stream, args=(p,), daemon=True) for p in PROMPTS]
        for thread in threads:
            thread.start()
        try:
            yield outcomes
        finally:
            done.set()
            for thread in threads:
                thread.join(120)


def deploy(app: str, replicas: int, engine: str):
    import grpc
    from ray import serve

    from cluster.config import ServeConfig
    from cluster.serving.app import application
    from protos import inference_pb2_grpc

    config = ServeConfig(num_workers=3, default_replicas=replicas, dtype="float32", engine=engine)
    serve.run(application(config, ray_actor_options={"num_cpus": 0, "resources": {SERVING: 1}}), name=app,
              route_prefix=f"/{app}")
    traffic = Traffic(inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"{HEAD_IP}:{GRPC_PORT}")), app)
    traffic.expected = {p: traffic.one(p).result for p in PROMPTS}
    assert all(isinstance(r, list) for r in traffic.expected.values()), traffic.expected
    return traffic


def victim(hosts: Hosts, status: dict, on_controller_host: bool) -> Victim | str:
    """A worker's host: the expert controller's, or one without it (so that each row is one fault); else why none."""
    node_address = {n["node_id"]: n["address"] for n in status["nodes"]}
    controller = node_address.get(status["controller_node_id"])
    on_hosts = [(h, w) for w in status["workers"] for h, a in hosts.addresses.items()
                if w.get("address", "").startswith(a + ":")]
    chosen = [(h, w) for h, w in on_hosts if (hosts.addresses[h] == controller) == on_controller_host]
    if not chosen:
        return f"no worker's host {'runs' if on_controller_host else 'is free of'} the controller (on {controller})"
    host, worker = chosen[0]
    return Victim(host, worker["worker"], int(worker["address"].rsplit(":", 1)[1]))


def status_now(app: str, timeout_s: float = 120.0) -> dict:
    """The application's status, waiting out a controller that Serve is starting again."""
    from cluster.control import ops

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ops.status(app)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def capacity_gap(app: str) -> str:
    """What keeps the application from full capacity now ("" at full capacity): it also says why a row never got
    back."""
    from cluster.control import ops

    try:
        status = ops.status(app)
    except Exception as error:  # a controller being started again
        return f"status failed: {str(error)[:200]}"
    dead = [w["worker"] for w in status["workers"] if not w["alive"]]
    gaps = [f"workers {dead} not alive (replacement error: {status['replacement_error'][:200] or 'none'})"] if dead else []
    if not status["routers"]:
        gaps.append("no router reports")
    if status["ejected_workers"]:
        gaps.append(f"workers {status['ejected_workers']} ejected by a router")
    return "; ".join(gaps)


def full_capacity(app: str) -> bool:
    return not capacity_gap(app)


def run_row(hosts: Hosts, traffic: Traffic, fault: Fault) -> dict:
    _wait(lambda: full_capacity(traffic.app), 240)  # the last row's recovery done
    target = victim(hosts, status_now(traffic.app), fault.on_controller_host)
    if isinstance(target, str):
        return {"what": fault.what, "skipped": target}
    row = {"what": fault.what, "victim": target.host, "hold_s": fault.hold_s}
    restarts, node = hosts.restarts[target.host], _ray_node(hosts.addresses[target.host])
    with traffic.running() as outcomes:
        time.sleep(2.0)
        started = time.monotonic()
        fault.start(hosts, target)
        side = _in_thread(fault.during, traffic.app) if fault.during else None
        time.sleep(fault.hold_s)
        fault.end(hosts, target)
        ended = time.monotonic()
        verdict_s = max(NODE_VERDICT_S, fault.hold_s)
        row["back_s"] = round(_back_s(traffic.app, node, lambda: hosts.restarts[target.host] > restarts, verdict_s), 2)
        if row["back_s"] == float("inf"):
            row["not_back"] = capacity_gap(traffic.app)
        back_at = time.monotonic()
        if side is not None:
            side.join(300)
            row.update(side.result)
        time.sleep(1.0)
    touched = [o for o in outcomes if o.ended > started and o.started < ended + row["back_s"]]
    failed = [o for o in outcomes if isinstance(o.result, str)]
    row.update(
        requests=len(outcomes),
        failed=len(failed),
        wrong=sum(not isinstance(o.result, str) and o.result != traffic.expected[o.prompt] for o in outcomes),
        slowest_touched_s=round(max((o.ended - o.started for o in touched), default=0.0), 2),
        slowest_failure_s=round(max((o.ended - o.started for o in failed), default=0.0), 2),
        errors=sorted({o.result for o in failed})[:3],
        node_restarts=hosts.restarts[target.host] - restarts,
    )
    if row["node_restarts"]:  # Ray ended the host's node: from the new node's start to full capacity
        row["back_after_node_s"] = round(back_at - hosts.started_at[target.host], 2)
    return row


def _back_s(app: str, node: str | None, restarted: Callable[[], bool], verdict_s: float,
            timeout_s: float = 240.0) -> float:
    """Seconds from the fault's end to full capacity. Ray may take the victim's node for dead up to `verdict_s`
    after the end (its health checks' connection to a host silent for long recovers slowly), and end it: then full
    capacity counts only once the host's supervisor has started its node again, since until then the old processes
    answer as if nothing happened."""
    started, back_at = time.monotonic(), None
    while (elapsed := time.monotonic() - started) < timeout_s:
        if _taken_for_dead(node):
            _wait(restarted, timeout_s)
            return time.monotonic() - started + _wait(lambda: full_capacity(app), timeout_s)
        if back_at is None and full_capacity(app):
            back_at = time.monotonic() - started  # the status call itself may take seconds
        if back_at is not None and elapsed >= verdict_s:
            return back_at
        time.sleep(0.2)
    return float("inf")


def _ray_node(address: str) -> str | None:
    """The id of the live Ray node at `address`."""
    import ray

    return next((n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == address), None)


def _taken_for_dead(node_id: str | None) -> bool:
    """Whether Ray has marked the node dead (a node cut off for long enough; it ends the node once it is back)."""
    import ray

    return any(n["NodeID"] == node_id and not n["Alive"] for n in ray.nodes())


def _in_thread(operation, app):
    thread = threading.Thread(target=lambda: setattr(thread, "result", operation(app)), daemon=True)
    thread.result = {}
    thread.start()
    return thread


def _wait(condition, timeout_s: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            return float("inf")
        time.sleep(0.2)
    return time.monotonic() - started


def run_matrix(rows: list[str], hosts: Hosts, env: dict, engine: str = "moecluster") -> dict:
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})  # before Ray reads them
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from cluster.serving.grpc_api import SERVICERS

    ray.init(address=f"{HEAD_IP}:6390", log_to_driver=False, namespace="moecluster")
    serve.start(proxy_location="HeadOnly", http_options={"host": HEAD_IP, "port": 8300},
                grpc_options=gRPCOptions(port=GRPC_PORT, grpc_servicer_functions=SERVICERS))
    report, traffic = {}, None
    try:
        for name in rows:
            fault = FAULTS[name]
            if traffic is None or _replicas(traffic) != fault.replicas:
                if traffic is not None:
                    serve.delete(traffic.app)
                traffic = deploy(f"r{fault.replicas}", fault.replicas, engine)
            report[name] = {**run_row(hosts, traffic, fault), "health": status_now(traffic.app)["health"]}
            print(json.dumps({name: report[name]}), flush=True)
        serve.shutdown()
    finally:  # before the hosts go: a driver still connected then aborts in Ray's excepthook, hiding the error
        ray.shutdown()
    return report


def _replicas(traffic: Traffic) -> int:
    return int(traffic.app.removeprefix("r"))


def format_table(report: dict) -> str:
    lines = ["| fault | requests | failed | wrong tokens | slowest touched | slowest failure | back to full capacity "
             "(after the host's new Ray node) |", "|---|---|---|---|---|---|---|"]
    for row in report.values():
        if "skipped" in row:
            lines.append(f"| {row['what']} | skipped: {row['skipped']} | | | | | |")
            continue
        lines.append(f"| {row['what']} | {row['requests']} | {row['failed']} | {row['wrong']} | "
                     f"{row['slowest_touched_s']} s | {row['slowest_failure_s']} s | {row['back_s']} s"
                     + (f" ({row['back_after_node_s']} s) |" if "back_after_node_s" in row else " |"))
    return "\n".join(lines)


def main() -> int:
    from tests.hosts import can_make_hosts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(FAULTS), help=f"of {', '.join(FAULTS)}")
    parser.add_argument("--engine", choices=["moecluster", "vllm"], default="moecluster",
                        help="the serving replica's engine (vllm: run it with a python that has vLLM)")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = set(rows) - set(FAULTS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    why_not = can_make_hosts()
    if why_not:
        print(f"cannot make hosts: {why_not}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the hosts are taken down on SIGTERM too
    with host_cluster() as (hosts, env):
        report = run_matrix(rows, hosts, env, args.engine)
    print(format_table(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
