"""Streaming replies in messages of several tokens: each message through Serve costs the replica and the proxy
about as much CPU as a decode step spends per sequence, so fewer messages leave more CPU for decoding."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from cluster.engine.sequence import Event


async def ready(queue: asyncio.Queue[Event]) -> Event:
    """The next event merged with every one already queued behind it, so a stream that fell behind the engine
    catches up in one message; a failed step's error is raised."""
    events = [await queue.get()]
    while not queue.empty():
        events.append(queue.get_nowait())
    error = next((e.error for e in events if e.error is not None), None)
    if error is not None:
        raise error
    return merged(events)


async def every(events: AsyncIterator[Event], interval: int) -> AsyncIterator[Event]:
    """The first event at once, then events of at least `interval` tokens; the last carries what is left."""
    batch: list[Event] = []
    first = True
    async with contextlib.aclosing(events):  # a client that leaves early closes `events` too
        async for event in events:
            batch.append(event)
            if first or event.finish_reason or sum(len(e.token_ids) for e in batch) >= interval:
                yield merged(batch)
                batch, first = [], False
    if batch:
        yield merged(batch)


def merged(events: list[Event]) -> Event:
    if len(events) == 1:
        return events[0]
    logprobs = None if events[0].logprobs is None else [lp for e in events for lp in e.logprobs or []]
    return Event(token_ids=[t for e in events for t in e.token_ids], text="".join(e.text for e in events),
                 finish_reason=events[-1].finish_reason, logprobs=logprobs, prompt_logprobs=events[0].prompt_logprobs)


_END = object()


async def interleave(streams: list[AsyncIterator[Event]]) -> AsyncIterator[tuple[int, Event]]:
    """(index of its stream, event) for every event of `streams`, as each comes; the first error is raised, and
    closing this stops every stream (their requests leave the batch)."""
    if len(streams) == 1:  # the usual request: no task and queue between the engine's events and the reply
        async with contextlib.aclosing(streams[0]) as only:
            async for event in only:
                yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, events: AsyncIterator[Event]) -> None:
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    await queue.put((index, event))
            await queue.put((index, _END))
        except Exception as error:  # noqa: BLE001 -- handed over: the reader raises it
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(i, events)) for i, events in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is _END:
                left -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
