"""The HTTP body limit (limits.max_body_bytes), applied before FastAPI reads a body: by its Content-Length, or,
for a chunked body, once the bytes read pass it."""

import json
import logging

from cluster.errors import InvalidRequest
from cluster.serving.openai_api import error_body

log = logging.getLogger(__name__)


class BodyLimit:
    """ASGI middleware. `max_bytes` is the serving replica's, set once it has read its config."""

    max_bytes = 1 << 20

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = BodyLimit.max_bytes
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > limit:
            return await refuse(send, f"the request body has {length.decode(errors='replace')} bytes; "
                                       f"limits.max_body_bytes is {limit}")
        read = 0

        async def counted():
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > limit:
                raise InvalidRequest(f"the request body passed limits.max_body_bytes ({limit})")
            return message

        await self.app(scope, counted, send)


async def refuse(send, message: str) -> None:
    """A 400 with `message`, before the application saw the request; one log line."""
    log.info("rejected request: %s", message)
    body = json.dumps(error_body(message, 400)).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
