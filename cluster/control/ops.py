"""The Python API for a running deployment: status, scale and rebalance, through its expert controller."""

import logging

import ray

from ray.serve._private.constants import SERVE_DEPLOYMENT_ACTOR_PREFIX, SERVE_NAMESPACE

from cluster.control.controller import CONTROLLER
from cluster.control.workers import NAMESPACE
from experts.keys import expert_key, parse_expert_key

DEFAULT_APP = "moecluster"


def connect(address: str | None = None) -> None:
    """Join the deployment's Ray cluster (`address`, or the local one) as a client driver."""
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False, logging_level=logging.ERROR)


def controllers(app: str) -> list:
    """The expert controllers of `app`'s running versions, newest first (two while a rollout is under way)."""
    prefix, suffix = f"{SERVE_DEPLOYMENT_ACTOR_PREFIX}{app}::", f"::{CONTROLLER}"
    handles = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if actor["namespace"] == SERVE_NAMESPACE and name.startswith(prefix) and name.endswith(suffix):
            try:
                handles.append(ray.get_actor(name, namespace=SERVE_NAMESPACE))
            except ValueError:
                pass  # gone since it was listed
    started = ray.get([handle.started.remote() for handle in handles])
    return [handle for _, handle in sorted(zip(started, handles), key=lambda pair: -pair[0])]


def _controller(app: str):
    """The newest version's controller: the one that serves once a rollout completes."""
    found = controllers(app)
    if not found:
        raise LookupError(f"no moecluster application {app!r} is running on this Ray cluster")
    return found[0]


def status(app: str = DEFAULT_APP) -> dict:
    return ray.get(_controller(app).status.remote())


def scale(replicas: dict[str, int], app: str = DEFAULT_APP) -> dict:
    """Set replica counts, e.g. scale({"3:7": 4}); loads new replicas before routing to them."""
    return ray.get(_controller(app).scale.remote(replicas))


def rebalance(app: str = DEFAULT_APP) -> dict:
    """One rebalance now, from the tokens per expert in the controller's window."""
    return ray.get(_controller(app).rebalance.remote())


def balance(status: dict) -> float:
    """max/mean tokens per worker since the plan last changed (1.0 is perfect; 0 without traffic)."""
    tokens = [w["tokens_since_plan"] for w in status["workers"]]
    mean = sum(tokens) / len(tokens) if tokens else 0
    return max(tokens) / mean if mean else 0.0


def format_status(status: dict) -> str:
    lines = [f"application {status['app']}  plan v{status['version']}  routing {status['routing_policy']}  placement {status['placement']}", "",
             "NODE                      ADDRESS          ALIVE"]
    lines += [f"{n['node_id'][:24]:<25} {n['address']:<16} {n['alive']}" for n in status["nodes"]]
    lines += ["", "WORKER  NODE                      ADDRESS               ALIVE  WEIGHTS   RESIDENT  TOKENS  REPLICAS"]
    for w in status["workers"]:
        weights, resident = (_mib(w.get(name)) for name in ("weight_bytes", "resident_bytes"))
        lines.append(f"{w['worker']:<7} {w.get('node_id', '-')[:24]:<25} {w.get('address', '-'):<21} "
                     f"{w['alive']!s:<6} {weights:<9} {resident:<9} {w['tokens_since_plan']:<7} "
                     f"{' '.join(w['replicas'])}")
    health = "  ".join(f"{name} {n}" for name, n in status["health"].items())
    lines += ["", f"health: {health}", f"ejected now: {status['ejected_workers'] or 'none'}",
              "", "ROUTER                            NODE                      PID      TABLE  EJECTED"]
    lines += [f"{r['router'][:32]:<33} {r['node_id'][:24]:<25} {r['pid']:<8} v{r['table_version']:<5} "
              f"{' '.join(map(str, r['ejected'])) or '-'}" for r in status["routers"]]
    if status["replacement_error"]:
        lines.append(f"replacement failing: {status['replacement_error']}")
    lines += ["", f"tokens per worker since the plan changed: max/mean = {balance(status):.2f}",
              f"tokens per expert over the last {status['window_s']:.0f}s (replicas):"]
    counts = status["replica_counts"]
    hot = sorted(status["tokens_per_expert"].items(), key=lambda kv: -kv[1])
    lines += [f"  {pair:>6}  {tokens:>8}  ({counts[pair]})" for pair, tokens in hot] or ["  (no traffic yet)"]
    return "\n".join(lines)


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}MiB"


SHADES = " .:-=+*#%@"  # no tokens, then ever more


def format_heatmap(status: dict) -> str:
    """Tokens per expert over the window as a map: one row per layer, one column per expert, darker is hotter."""
    counts = status["replica_counts"]
    tokens = status["tokens_per_expert"]
    shape: dict[int, int] = {}
    for key in counts:
        layer, expert = parse_expert_key(key)
        shape[layer] = max(shape.get(layer, 0), expert + 1)
    hottest = max(tokens.values(), default=0)
    lines = [f"tokens per expert over the last {status['window_s']:.0f}s; darkest = {hottest} tokens", ""]
    width = max(shape.values(), default=0)
    lines.append("layer  " + "".join(str(e % 10) for e in range(width)))
    for layer in sorted(shape):
        row = [tokens.get(expert_key(layer, e), 0) for e in range(shape[layer])]
        cells = "".join(SHADES[_shade(n, hottest)] for n in row)
        lines.append(f"{layer:>5}  {cells}  max/mean {_imbalance(row):.2f}")
    lines += ["", f"scale: '{SHADES[1]}' fewest tokens ... '{SHADES[-1]}' most; ' ' none"]
    return "\n".join(lines)


def _shade(n: int, hottest: int) -> int:
    return 0 if not n else 1 + min(len(SHADES) - 2, (len(SHADES) - 2) * n // hottest)


def _imbalance(row: list[int]) -> float:
    mean = sum(row) / len(row) if row else 0
    return max(row) / mean if mean else 0.0
