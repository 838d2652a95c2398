"""The parts of `engine: vllm`'s serving replica that need no vLLM: its key check around vLLM's app, and the routing
table and live settings as the router in vLLM's worker process receives them."""

import asyncio
import json
from types import SimpleNamespace

from cluster.config import ServeConfig
from cluster.serving.auth import ApiKeys
from cluster.serving.vllm_server import _KeyCheck
from cluster.vllm_engine import tier
from router.remote import ExpertRouter
from router.table import RoutingTable

KEY = "k-123"


def _call(scope: dict) -> list[dict]:
    sent, reached = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    replica = SimpleNamespace(keys=ApiKeys([KEY]), config=ServeConfig())
    asyncio.run(_KeyCheck(app, replica)(scope, None, send))
    return reached or sent


def _scope(path: str, key: str | None = None, kind: str = "http") -> dict:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    return {"type": kind, "path": f"/app{path}", "root_path": "/app", "headers": headers}


def test_every_route_but_the_probes_needs_a_key():
    assert _call(_scope("/health")) == ["/app/health"]  # under Serve's route prefix
    assert _call(_scope("/v1/completions", KEY)) == ["/app/v1/completions"]
    start, body = _call(_scope("/v1/completions", "wrong"))
    assert start["status"] == 401 and json.loads(body["body"])["error"]["code"] == "invalid_api_key"
    assert _call(_scope("/metrics"))[0]["status"] == 401  # metrics_open is off
    (closed,) = _call(_scope("/v1/realtime", kind="websocket"))
    assert closed["type"] == "websocket.close" and closed["code"] == 1008


def test_the_router_takes_tables_and_live_settings_as_plain_data():
    table = RoutingTable(3, {0: "a:1", 1: "b:2"}, {0: [[0], [0, 1]], 1: [[1], [0]]}, frozenset({2}))
    assert tier.table_of(json.loads(json.dumps(tier.table_data(table)))) == table
    router = ExpertRouter(RoutingTable(0, {}), SimpleNamespace(timeout_s=30.0))
    try:
        config = ServeConfig(hedge={"enabled": False}, expert_timeout_s=2.0).model_dump(mode="json")
        tier.apply_reply(router, json.loads(json.dumps({"table": tier.table_data(table), "config": config})))
        assert router.table == table and router.hedging is None and router.client.timeout_s == 2.0
        assert router.deadlines is not None
    finally:
        router.close()
