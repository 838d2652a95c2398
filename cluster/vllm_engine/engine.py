"""The serving replica's engine: vLLM's AsyncLLM, whose requests that needed a lost expert fail with 503 /
UNAVAILABLE before a token of theirs is sent, while every other request goes on.

Each request carries the replica's id for it to vLLM's worker process (`lost.REQUEST_TAG`), where `LostRequests`
finds the requests whose logits a lost expert left NaN and tells the replica, which calls `lose` before the step's
tokens reach it.
"""

import asyncio
import contextlib
import logging

from vllm.exceptions import RetryableRequestError
from vllm.v1.engine.async_llm import AsyncLLM

from cluster.vllm_engine.lost import REQUEST_TAG

log = logging.getLogger(__name__)


class ExpertsLost(RetryableRequestError):
    """503 in vLLM's OpenAI server; the gRPC API answers it UNAVAILABLE."""


class TierEngine(AsyncLLM):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lost: dict[str, str] = {}  # request id -> why it failed, until its generate ends
        self._drops: set[asyncio.Task] = set()  # held until done: the loop keeps only weak references

    async def generate(self, prompt, sampling_params, request_id, **kwargs):
        params = sampling_params.clone()  # vLLM's server gives every prompt of a request the same params
        params.extra_args = {**(params.extra_args or {}), REQUEST_TAG: request_id}
        try:
            async with contextlib.aclosing(super().generate(prompt, params, request_id, **kwargs)) as outputs:
                async for output in outputs:
                    if request_id in self.lost:
                        raise ExpertsLost(self.lost[request_id])
                    yield output
        finally:
            self.lost.pop(request_id, None)

    def lose(self, request_ids: list[str], why: str) -> None:
        """The requests needed an expert with no live replica: each fails at its next output, and the KV blocks
        that hold NaN leave the prefix cache (running requests are recomputed, which costs time, never a token)."""
        new = [request_id for request_id in request_ids if request_id not in self.lost]  # told again, a step later
        if not new:
            return
        for request_id in new:
            self.lost[request_id] = why
            log.warning("request %s failed: %s", request_id, why)
        drop = asyncio.get_running_loop().create_task(self._drop(new))
        self._drops.add(drop)
        drop.add_done_callback(self._drops.discard)

    async def _drop(self, request_ids: list[str]) -> None:
        await self.abort(request_ids)
        if not await self.reset_prefix_cache(reset_running_requests=True):
            log.error("the prefix cache could not be reset: requests sharing a lost request's prefix may fail too")
