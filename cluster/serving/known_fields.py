"""Request fields an OpenAI server does not know, refused by name: vLLM's request models accept any field and drop
the ones they do not know with a debug line, and a client that asked for something must not get an answer that
ignored it."""

import json
from collections.abc import Iterable

from pydantic import BaseModel

from cluster.serving.body_limit import refuse


def field_names(models: Iterable[type[BaseModel]]) -> frozenset[str]:
    """Every field name and alias of `models`."""
    names = set()
    for model in models:
        for name, field in model.model_fields.items():
            names |= {name, field.alias} - {None}
    return frozenset(names)


def unknown_fields(body: bytes, known: frozenset[str]) -> list[str]:
    """The top-level fields of a JSON object body that are not `known` (none for a body that is not an object:
    the server's own parsing refuses it)."""
    try:
        data = json.loads(body)
    except ValueError:
        return []
    return sorted(data.keys() - known) if isinstance(data, dict) else []


class KnownFields:
    """ASGI middleware: a JSON body posted to one of `routes` (path -> the field names its request model knows)
    with a field outside them is a 400 naming it; any other request passes untouched."""

    def __init__(self, app, routes: dict[str, frozenset[str]]):
        self.app, self.routes = app, routes

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        known = self.routes.get(path) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if known is None:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:  # the body limit, outside this, bounds what is read
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        unknown = unknown_fields(body, known)
        if unknown:
            return await refuse(send, f"{', '.join(unknown)}: not supported by this server")
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages: list[dict], receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed
