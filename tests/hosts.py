"""Real hosts on one machine: Linux network namespaces joined by a bridge, each with its own address and a Ray node
joined to a head over TCP with Ray's token authentication. Routers reach expert workers over the network, as in a
Kubernetes deployment (abstract Unix sockets do not cross namespaces), and a host can be cut off with no reset,
partitioned one way, have one port blocked, or lose its processes.

`tests/host_matrix.py` runs the cross-host fault matrix on it. Needs root, iproute2 and iptables; everything it
starts it stops by process id, and it leaves no namespace, link or rule behind (rules live in their namespace).
"""

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
from collections import Counter
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
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install {package})"
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
        self.restarts: Counter[str] = Counter()
        self.started_at: dict[str, float] = {}  # host -> when its Ray node last came up
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None

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
        self._closing.set()
        if self._supervisor is not None:  # a node it is starting now must be on the list before it is emptied
            self._supervisor.join()
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
        since = log.stat().st_size if log.exists() else 0
        self.nodes[name] = (command, env, log, self.start(command, env, log, netns=name))
        _wait_started(log, since, self._closing)
        self.started_at[name] = time.monotonic()

    def supervise(self) -> None:
        """Start a host's Ray node again whenever it exits, as a supervisor would (Kubernetes restarting the pod,
        systemd on a plain machine): Ray ends a node it took for dead once the node can reach the head again."""
        def watch():
            while not self._closing.wait(0.5):
                for name, (command, env, log, process) in list(self.nodes.items()):
                    if process.poll() is not None and not self._closing.is_set():
                        self.restarts[name] += 1
                        with contextlib.suppress(RuntimeError):  # it exits again, and is started again
                            self.start_node(name, command, env, log)

        self._supervisor = threading.Thread(target=watch, name="hosts-supervisor", daemon=True)
        self._supervisor.start()

    def cut(self, name: str) -> None:
        """Cut `name` off: its link goes down, and packets stop both ways with no reset."""
        _ip("link", "set", self.link(name), "down")

    def restore(self, name: str) -> None:
        _ip("link", "set", self.link(name), "up")

    def drop(self, name: str, rule: list[str]) -> None:
        """Drop the packets `rule` matches as they arrive at `name` (iptables, in its namespace)."""
        _iptables(name, "-I", "INPUT", *rule, "-j", "DROP")

    def undrop(self, name: str, rule: list[str]) -> None:
        _iptables(name, "-D", "INPUT", *rule, "-j", "DROP")

    def kill(self, name: str) -> int:
        """SIGKILL every process on `name` (its Ray node and the actors on it); the kernel closes their sockets.
        The supervisor starts the node again. Returns how many processes were killed."""
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in map(int, pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)


def _iptables(netns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "iptables", *args], check=True, capture_output=True)


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


def _wait_started(log: Path, since: int, stop: threading.Event, timeout_s: float = 120.0) -> None:
    """Until `ray start --block` logged (after byte `since`) that its node runs, or `stop` is set; its log's tail if
    it failed or timed out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stop.is_set():
            return
        text = log.read_bytes()[since:].decode(errors="replace")
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


@contextlib.contextmanager
def host_cluster(count: int = 3):
    """`count` hosts, each with a Ray node joined to a head on this one and kept running by a supervisor; yields
    (hosts, the environment a driver needs). Logs are kept where MOECLUSTER_KEEP_HOST_LOGS is set."""
    temp_dir = tempfile.mkdtemp(prefix="ray-hosts-")
    try:
        with Hosts(count) as hosts:
            env = ray_cluster(hosts, temp_dir)
            hosts.supervise()
            yield hosts, env
    finally:
        if os.environ.get("MOECLUSTER_KEEP_HOST_LOGS") is None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        else:
            print(f"host logs kept in {temp_dir}", file=sys.stderr)
