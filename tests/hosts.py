"""Real hosts on one machine: Linux network namespaces joined by a bridge, each with its own address and a Ray node
joined to a head over TCP with Ray's token authentication. Routers reach expert workers over the network, as in a
Kubernetes deployment (abstract Unix sockets do not cross namespaces), and a host can be cut off with no reset.

    python -m tests.hosts [--cut-s 30] [--json-out hosts.json]

runs the cross-host fault scenario and prints its report (tests/integration/test_hosts.py runs it in CI). Needs
root and iproute2; everything it starts it stops by process id, and it leaves no namespace or link behind.
"""

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SUBNET = "10.77.0"
BRIDGE = "mcbr0"
HEAD_IP = f"{SUBNET}.1"
GCS_PORT = 6390
OBJECT_STORE = f"--object-store-memory={256 << 20}"
SERVING = "moecluster-serving"  # the custom resource only the head offers: the serving replica runs there


def can_make_hosts() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = subprocess.run(["ip", "netns", "add", "mc-probe"], capture_output=True, text=True)
    if probe.returncode:
        return f"`ip netns add` is refused: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "mc-probe"], check=False)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    subprocess.run(command, check=True, capture_output=True)


class Hosts:
    """`count` hosts h1..hN at SUBNET.11.. behind a bridge whose address (SUBNET.1) is the head's host: this one."""

    def __init__(self, count: int):
        self.names = [f"mc-h{i}" for i in range(1, count + 1)]
        self.addresses = {name: f"{SUBNET}.{10 + i}" for i, name in enumerate(self.names, 1)}
        self.processes: list[subprocess.Popen] = []
        self.nodes: dict[str, tuple[list[str], dict, Path, subprocess.Popen]] = {}  # host -> its Ray node

    def __enter__(self):
        try:
            _ip("link", "add", BRIDGE, "type", "bridge")
            _ip("addr", "add", f"{HEAD_IP}/24", "dev", BRIDGE)
            _ip("link", "set", BRIDGE, "up")
            for name in self.names:
                _ip("netns", "add", name)
                _ip("link", "add", self.link(name), "type", "veth", "peer", "name", "eth0", "netns", name)
                _ip("link", "set", self.link(name), "master", BRIDGE, "up")
                _ip("addr", "add", f"{self.addresses[name]}/24", "dev", "eth0", netns=name)
                _ip("link", "set", "eth0", "up", netns=name)
                _ip("link", "set", "lo", "up", netns=name)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for process in reversed(self.processes):
            _stop(process)
        for name in self.names:
            subprocess.run(["ip", "link", "del", self.link(name)], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)

    @staticmethod
    def link(name: str) -> str:
        return f"mc-v{name.removeprefix('mc-h')}"

    def start(self, command: list[str], env: dict, log: Path, netns: str | None = None) -> subprocess.Popen:
        """`command` on host `netns` (None: the head's), in a session of its own, stopped on exit."""
        prefix = ["ip", "netns", "exec", netns] if netns else []
        with open(log, "ab") as out:
            process = subprocess.Popen([*prefix, *command], env=env, start_new_session=True, stdout=out,
                                       stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def start_node(self, name: str, command: list[str], env: dict, log: Path) -> None:
        self.nodes[name] = (command, env, log, self.start(command, env, log, netns=name))
        _wait_started(log)

    def revive(self, name: str) -> bool:
        """Start `name`'s Ray node again if it has exited (Ray ends a node that was taken for dead), as a
        supervisor would (Kubernetes restarting the pod; systemd on a plain machine). True if it had to."""
        command, env, log, process = self.nodes[name]
        if process.poll() is None:
            return False
        self.start_node(name, command, env, log)
        return True

    def cut(self, name: str) -> None:
        """Cut `name` off: its link goes down, and packets stop both ways with no reset."""
        _ip("link", "set", self.link(name), "down")

    def restore(self, name: str) -> None:
        _ip("link", "set", self.link(name), "up")


def _stop(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group `process` leads (Ray's `--block` takes its daemons down with it), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def ray_cluster(hosts: Hosts, temp_dir: str, node_cpus: int = 2) -> dict:
    """A Ray head on the head's host (no CPUs for experts; one serving slot) and a node on each host; returns
    the environment a driver needs to join it."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats"]
    hosts.start([*ray, "--head", f"--node-ip-address={HEAD_IP}", f"--port={GCS_PORT}", "--num-cpus=0",
                 f"--resources={json.dumps({SERVING: 1})}", "--include-dashboard=false", OBJECT_STORE,
                 f"--temp-dir={temp_dir}"], env, Path(temp_dir) / "head.log")
    _wait_port(HEAD_IP, GCS_PORT)
    for name in hosts.names:  # one at a time: nodes that start together on two cores time out
        hosts.start_node(name, [*ray, f"--address={HEAD_IP}:{GCS_PORT}", f"--node-ip-address={hosts.addresses[name]}",
                                f"--num-cpus={node_cpus}", OBJECT_STORE], env, Path(temp_dir) / f"{name}.log")
    return env


def _wait_started(log: Path, timeout_s: float = 120.0) -> None:
    """Until `ray start --block` logged that its node runs; its log's tail if it failed or timed out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "block forever" in text:
            return
        if "Traceback" in text:
            break
        time.sleep(0.2)
    raise RuntimeError(f"a Ray node did not start ({log}):\n{log.read_text(errors='replace')[-2000:]}")


def _wait_port(host: str, port: int, timeout_s: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s")


# --- the scenario, run as a driver of that cluster ---

PROMPTS = [f"host {i}: experts keep serving" for i in range(8)]
MAX_TOKENS = 16


def scenario(cut_s: float, hosts_env: dict, hosts: Hosts, call_deadline: bool = True) -> dict:
    """Serve with 3 workers (one per host) and 2 replicas of every expert at the default expert deadline, drive 8
    closed-loop greedy streams, cut one worker's host off for `cut_s`, restore it; report what it cost."""
    os.environ.update({k: hosts_env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})  # before Ray reads them
    import grpc
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from cluster.config import ServeConfig
    from cluster.control import ops
    from cluster.serving.app import application
    from cluster.serving.grpc_api import SERVICERS
    from protos import inference_pb2, inference_pb2_grpc

    ray.init(address=f"{HEAD_IP}:{GCS_PORT}", log_to_driver=False)
    names, addresses = hosts.names, hosts.addresses
    wait_until(lambda: sum(n["Alive"] for n in ray.nodes()) == len(names) + 1, 60, "every host's Ray node")
    grpc_port = 9300
    serve.start(proxy_location="HeadOnly", http_options={"host": HEAD_IP, "port": 8300},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=SERVICERS))
    config = ServeConfig(num_workers=len(names), default_replicas=2, dtype="float32",
                         call_deadline={"enabled": call_deadline})
    serve.run(application(config, ray_actor_options={"num_cpus": 0, "resources": {SERVING: 1}}), name="hosts",
              route_prefix="/hosts")
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"{HEAD_IP}:{grpc_port}"))

    def one(prompt):
        started = time.monotonic()
        try:
            request = inference_pb2.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            out = [t for r in stub.Generate(request, timeout=60, metadata=[("application", "hosts")])
                   for t in r.token_ids]
        except grpc.RpcError as error:
            out = f"{error.code().name}: {error.details()}"
        return out, started, time.monotonic()

    expected = {p: one(p)[0] for p in PROMPTS}
    status = ops.status("hosts")
    worker = status["workers"][0]
    victim = next(name for name, address in addresses.items() if worker["address"].startswith(address + ":"))
    outcomes, done = [], threading.Event()

    def stream(prompt):
        while not done.is_set():
            outcomes.append((prompt, *one(prompt)))

    report = {"hosts": len(names), "cut_s": cut_s, "victim": victim, "call_deadline": call_deadline}
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(stream, p) for p in PROMPTS]
        try:
            time.sleep(3.0)
            cut_at = time.monotonic()
            hosts.cut(victim)
            time.sleep(cut_s)
            hosts.restore(victim)
            restored_at = time.monotonic()
            time.sleep(5.0)  # a node Ray took for dead ends itself once it can reach the head again
            report["node_restarted"] = hosts.revive(victim)
            wait_until(lambda: _full_capacity(ops.status("hosts")), 180, "full capacity")
            report["back_s"] = time.monotonic() - restored_at
            time.sleep(2.0)
        finally:
            done.set()
        for future in futures:
            future.result()
    touched = [o for o in outcomes if o[3] > cut_at and o[2] < restored_at + report["back_s"]]
    report.update(
        requests=len(outcomes),
        failed=sum(isinstance(o[1], str) for o in outcomes),
        wrong=sum(not isinstance(o[1], str) and o[1] != expected[o[0]] for o in outcomes),
        slowest_s=round(max(o[3] - o[2] for o in outcomes), 2),
        slowest_touched_s=round(max((o[3] - o[2] for o in touched), default=0.0), 2),
        errors=sorted({o[1] for o in outcomes if isinstance(o[1], str)})[:3],
        health=ops.status("hosts")["health"],
    )
    serve.shutdown()
    ray.shutdown()
    return report


def _full_capacity(status: dict) -> bool:
    return not status["ejected_workers"] and all(w["alive"] for w in status["workers"])


def wait_until(condition, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--cut-s", type=float, default=30.0)
    parser.add_argument("--no-call-deadline", action="store_true",
                        help="every call waits the whole expert deadline (how it was before call_deadline)")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    why_not = can_make_hosts()
    if why_not:
        print(f"cannot make hosts: {why_not}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the hosts are taken down on SIGTERM too
    temp_dir = tempfile.mkdtemp(prefix="ray-hosts-")
    try:
        with Hosts(args.hosts) as hosts:
            env = ray_cluster(hosts, temp_dir)
            report = scenario(args.cut_s, env, hosts, call_deadline=not args.no_call_deadline)
    finally:
        if os.environ.get("MOECLUSTER_KEEP_HOST_LOGS") is None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
