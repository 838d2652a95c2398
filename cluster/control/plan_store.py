"""Where a restarted controller finds the plan it was serving: Ray's internal KV, which lives in the GCS and so
outlives every actor (and, with GCS fault tolerance, the head node too).

Records are kept per scope: one version of one application (`controller.scope`), so two versions never share a
plan or a data-path key."""

import json
import secrets

from ray.experimental import internal_kv

NAMESPACE = "moecluster"
Plan = list[list[tuple[int, int]]]


def _key(scope: str, record: str = "plan") -> bytes:
    return f"{scope}:{record}".encode()


def save(scope: str, version: int, plan: Plan, counts: dict[tuple[int, int], int]) -> None:
    record = {"version": version, "plan": plan, "counts": [[layer, e, n] for (layer, e), n in counts.items()]}
    internal_kv._internal_kv_put(_key(scope), json.dumps(record).encode(), overwrite=True, namespace=NAMESPACE)


def load(scope: str) -> tuple[int, Plan, dict[tuple[int, int], int]] | None:
    """(version, plan, replica counts) last saved for `scope`, or None."""
    raw = internal_kv._internal_kv_get(_key(scope), namespace=NAMESPACE)
    if raw is None:
        return None
    record = json.loads(raw)
    plan = [[(layer, e) for layer, e in pairs] for pairs in record["plan"]]
    return record["version"], plan, {(layer, e): n for layer, e, n in record["counts"]}


def save_live(scope: str, live: dict) -> None:
    """The live fields of the serving config the controller last applied."""
    internal_kv._internal_kv_put(_key(scope, "live"), json.dumps(live).encode(), overwrite=True, namespace=NAMESPACE)


def load_live(scope: str) -> dict:
    raw = internal_kv._internal_kv_get(_key(scope, "live"), namespace=NAMESPACE)
    return json.loads(raw) if raw is not None else {}


def delete(scope: str) -> None:
    for record in ("plan", "live", "data-path-key"):
        internal_kv._internal_kv_del(_key(scope, record), namespace=NAMESPACE)


def data_path_key(scope: str) -> str:
    """`scope`'s data-path key, which its expert workers ask of every caller: made on first use, then the same for
    every controller and serving replica of that version."""
    key = _key(scope, "data-path-key")
    internal_kv._internal_kv_put(key, secrets.token_urlsafe(32).encode(), overwrite=False, namespace=NAMESPACE)
    return internal_kv._internal_kv_get(key, namespace=NAMESPACE).decode()
