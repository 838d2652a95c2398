"""A bounded chaos run: random faults from the fault matrix while 16 greedy streams generate, then a report.

    python -m tests.chaos --minutes 5 [--streams 16] [--seed 0] [--json-out chaos.json]

It starts a simulated 4-node Ray cluster on this machine (as the integration tests do), serves the embedded default
model with 2 replicas of every expert over 3 workers and 2 Serve replicas, and every `--interval-s` does one fault
at random: a worker SIGKILLed, SIGSTOPped past the deadline, slowed on a duty cycle or answering malformed replies,
the controller SIGKILLed, or a Serve replica SIGKILLed. Every completed request's tokens must equal the
fault-free run's (the report's `wrong` must be 0). It is not part of CI's run.
"""

import argparse
import json
import os
import random
import signal
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from tests.integration.faults import duty_cycle, pids_titled, stall

APP = "chaos"
DEADLINE_S = 1.0


def main() -> None:
    args = _parse()
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.config import gRPCOptions

    from cluster.config import ServeConfig
    from cluster.control import ops
    from cluster.demo_model import default_model_dir
    from cluster.node_env import apply_node_env
    from cluster.serving.app import application
    from cluster.serving.grpc_api import SERVICERS
    from protos import inference_pb2_grpc

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-"))
    apply_node_env()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    for _ in range(3):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    serve.start(grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=SERVICERS),
                http_options={"host": "127.0.0.1", "port": args.http_port})
    config = ServeConfig(model=str(default_model_dir()), model_name=APP, num_workers=3, default_replicas=2,
                         expert_timeout_s=DEADLINE_S, dtype="float32", num_replicas=2)
    serve.run(application(config), name=APP, route_prefix=f"/{APP}")
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{args.grpc_port}"))
    prompts = [f"chaos {i}: experts keep serving" for i in range(args.streams)]
    try:
        expected = {p: _request(stub, p) for p in prompts}
        assert all(isinstance(t, list) for t in expected.values()), expected
        report = _run(args, stub, prompts, expected, ops)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


def _parse():
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--interval-s", type=float, default=20.0, help="seconds between faults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grpc-port", type=int, default=19000)
    parser.add_argument("--http-port", type=int, default=18000)
    parser.add_argument("--json-out")
    return parser.parse_args()


def _request(stub, prompt: str):
    from protos import inference_pb2

    try:
        request = inference_pb2.GenerateRequest(prompt=prompt, max_tokens=24, temperature=0)
        return [t for r in stub.Generate(request, timeout=120, metadata=[("application", APP)]) for t in r.token_ids]
    except grpc.RpcError as error:
        return error.code().name


def _run(args, stub, prompts, expected, ops) -> dict:
    rng, done = random.Random(args.seed), threading.Event()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def stream(prompt):
        while not done.is_set():
            out = _request(stub, prompt)
            kind = "completed" if out == expected[prompt] else "wrong" if isinstance(out, list) else f"failed:{out}"
            with lock:
                outcomes[kind] += 1
            if kind.startswith("failed"):
                time.sleep(0.1)

    memory_before = _memory()
    faults_done = []
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream, p) for p in prompts]
        ends = time.monotonic() + 60 * args.minutes
        try:
            while time.monotonic() + args.interval_s < ends:
                time.sleep(args.interval_s / 2)
                name, fault = rng.choice(list(_faults(ops, rng).items()))
                fault()
                recovery_s = _recovered(ops)
                faults_done.append({"fault": name, "recovery_s": recovery_s})
                time.sleep(args.interval_s / 2)
        finally:
            done.set()
            for f in futures:
                f.result()
    return {"minutes": args.minutes, "streams": args.streams, "outcomes": dict(outcomes),
            "wrong": outcomes.get("wrong", 0), "faults": faults_done,
            "memory_mib": {"before": memory_before, "after": _memory()}, "health": ops.status(APP)["health"]}


def _faults(ops, rng: random.Random) -> dict:
    import ray

    from cluster.control.workers import NAMESPACE, worker_name

    def worker_pid():
        return rng.choice([w["pid"] for w in ops.status(APP)["workers"] if w["alive"]])

    def malformed():
        slot = rng.randrange(3)
        actor = ray.get_actor(worker_name(ops.status(APP)["scope"], slot), namespace=NAMESPACE)
        ray.get(actor.inject_fault.remote(True))
        time.sleep(3)
        ray.get(actor.inject_fault.remote(False))

    return {
        "worker SIGKILL": lambda: os.kill(worker_pid(), signal.SIGKILL),
        "worker SIGSTOP 4s": lambda: stall(worker_pid(), 4.0),
        "worker duty cycle": lambda: duty_cycle(worker_pid(), 0.6, 0.6, 5),
        "worker malformed replies": malformed,
        "controller SIGKILL": lambda: os.kill(ops.status(APP)["controller_pid"], signal.SIGKILL),
        "Serve replica SIGKILL": lambda: os.kill(rng.choice(pids_titled(f"ray::ServeReplica:{APP}:")),
                                                 signal.SIGKILL),
    }


def _recovered(ops, timeout_s: float = 120.0) -> float | None:
    """Seconds until every worker is alive, none ejected and both routers check in; None if not within timeout."""
    import ray

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            status = ops.status(APP)
            if (all(w["alive"] for w in status["workers"]) and not status["ejected_workers"]
                    and len(status["routers"]) == 2):
                return round(time.monotonic() - started, 2)
        except (ray.exceptions.RayError, LookupError):  # the controller is restarting
            pass
        time.sleep(0.2)
    return None


def _memory() -> dict[str, float]:
    """Resident MiB of each Ray process of the application, by title."""
    out: dict[str, float] = {}
    for title in ("ray::ExpertWorker", "ray::ExpertController", f"ray::ServeReplica:{APP}:", "ray::ProxyActor"):
        for pid in pids_titled(title):
            try:
                rss = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS"))
            except (OSError, StopIteration):
                continue
            out[f"{title} {pid}"] = round(int(rss.split()[1]) / 1024, 1)
    return out


if __name__ == "__main__":
    main()
