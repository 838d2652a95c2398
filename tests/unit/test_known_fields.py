"""Unknown request fields refused by name in front of an OpenAI server whose request models drop them."""

import asyncio
import json

from pydantic import BaseModel, Field

from cluster.serving.known_fields import KnownFields, field_names, unknown_fields


class Completion(BaseModel):
    prompt: str
    max_tokens: int = 16
    top_logprobs: int | None = Field(None, alias="logprobs")


ROUTES = {"/v1/completions": field_names([Completion])}


def _post(body: bytes, path: str = "/v1/completions", chunks: int = 1) -> tuple[int | None, bytes]:
    """(status, body) of a 400 sent before the app, or (None, the body the app read)."""
    pieces = [body[i * len(body) // chunks:(i + 1) * len(body) // chunks] for i in range(chunks)]
    messages = [{"type": "http.request", "body": p, "more_body": i < chunks - 1} for i, p in enumerate(pieces)]
    sent, read = [], []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        more = True
        while more:
            message = await receive()
            read.append(message.get("body", b""))
            more = message.get("more_body", False)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    asyncio.run(KnownFields(app, ROUTES)(scope, receive, send))
    if sent:
        return sent[0]["status"], sent[1]["body"]
    return None, b"".join(read)


def test_names_and_aliases_are_known():
    assert field_names([Completion]) == {"prompt", "max_tokens", "top_logprobs", "logprobs"}
    assert unknown_fields(b'{"prompt": "x", "logprobs": 1, "best_of": 2, "guided_json": {}}',
                          ROUTES["/v1/completions"]) == ["best_of", "guided_json"]


def test_an_unknown_field_is_a_400_naming_it():
    status, body = _post(json.dumps({"prompt": "x", "suffix": "y"}).encode())
    assert status == 400
    assert json.loads(body)["error"]["message"] == "suffix: not supported by this server"


def test_known_fields_reach_the_app_with_the_body_whole():
    body = json.dumps({"prompt": "x" * 5000, "max_tokens": 3}).encode()
    assert _post(body, chunks=3) == (None, body)


def test_what_is_not_a_json_object_or_not_a_checked_route_passes_to_the_app():
    assert _post(b"not json") == (None, b"not json")
    assert _post(b"[1, 2]") == (None, b"[1, 2]")
    assert _post(b'{"anything": 1}', path="/v1/models") == (None, b'{"anything": 1}')
