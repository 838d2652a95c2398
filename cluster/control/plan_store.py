"""Where a restarted controller finds the plan it was serving: Ray's internal KV, which lives in the GCS and so
outlives every actor (and, with GCS fault tolerance, the head node too)."""

import json
import secrets

from ray.experimental import internal_kv

NAMESPACE = "moecluster"
Plan = list[list[tuple[int, int]]]


def _key(app: str, record: str = "plan") -> bytes:
    return f"{app}:{record}".encode()


def save(app: str, version: int, plan: Plan, counts: dict[tuple[int, int], int]) -> None:
    record = {"version": version, "plan": plan, "counts": [[layer, e, n] for (layer, e), n in counts.items()]}
    internal_kv._internal_kv_put(_key(app), json.dumps(record).encode(), overwrite=True, namespace=NAMESPACE)


def load(app: str) -> tuple[int, Plan, dict[tuple[int, int], int]] | None:
    """(version, plan, replica counts) last saved for `app`, or None."""
    raw = internal_kv._internal_kv_get(_key(app), namespace=NAMESPACE)
    if raw is None:
        return None
    record = json.loads(raw)
    plan = [[(layer, e) for layer, e in pairs] for pairs in record["plan"]]
    return record["version"], plan, {(layer, e): n for layer, e, n in record["counts"]}


def delete(app: str) -> None:
    for record in ("plan", "data-path-key"):
        internal_kv._internal_kv_del(_key(app, record), namespace=NAMESPACE)


def data_path_key(app: str) -> str:
    """`app`'s data-path key, which its expert workers ask of every caller: made on first use, then the same for
    every controller and serving replica of the application."""
    key = _key(app, "data-path-key")
    internal_kv._internal_kv_put(key, secrets.token_urlsafe(32).encode(), overwrite=False, namespace=NAMESPACE)
    return internal_kv._internal_kv_get(key, namespace=NAMESPACE).decode()
