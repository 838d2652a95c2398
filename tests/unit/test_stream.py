import asyncio

import pytest

from cluster.engine.sequence import Event
from cluster.errors import Overloaded
from cluster.serving.stream import every, interleave, ready


def _tokens(n: int, finish: str = "length"):
    async def events():
        for i in range(n):
            yield Event(token_ids=[i], text=f"<{i}>", finish_reason=finish if i == n - 1 else None)
    return events()


def _collect(events) -> list[Event]:
    async def run():
        return [e async for e in events]
    return asyncio.run(run())


def test_first_token_alone_then_interval_tokens_per_message():
    out = _collect(every(_tokens(10), 4))
    assert [e.token_ids for e in out] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert "".join(e.text for e in out) == "".join(f"<{i}>" for i in range(10))
    assert [e.finish_reason for e in out] == [None, None, None, "length"]


def test_interval_one_streams_every_token():
    out = _collect(every(_tokens(5), 1))
    assert [e.token_ids for e in out] == [[i] for i in range(5)]


def test_a_client_leaving_early_closes_the_token_source():
    closed = []

    async def events():
        try:
            for i in range(100):
                yield Event(token_ids=[i], text="")
        finally:
            closed.append(True)

    async def run():
        stream = every(events(), 2)
        await anext(stream)
        await stream.aclose()

    asyncio.run(run())
    assert closed == [True]


def test_events_of_several_tokens_count_by_tokens():
    async def events():
        for ids in ([0], [1, 2], [3, 4, 5], [6]):
            yield Event(token_ids=ids, text="", finish_reason="length" if ids == [6] else None)

    out = _collect(every(events(), 4))
    assert [e.token_ids for e in out] == [[0], [1, 2, 3, 4, 5], [6]]


def _queued(*events: Event) -> asyncio.Queue:
    queue = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)
    return queue


def test_ready_merges_what_queued_behind_the_next_event():
    async def run():
        queue = _queued(Event([1], "a"), Event([2], "b"), Event([3], "c", finish_reason="stop"))
        return await ready(queue), queue.qsize()

    event, left = asyncio.run(run())
    assert (event.token_ids, event.text, event.finish_reason, left) == ([1, 2, 3], "abc", "stop", 0)


def test_ready_waits_for_the_next_event():
    async def run():
        queue = asyncio.Queue()
        asyncio.get_running_loop().call_later(0.01, queue.put_nowait, Event([7], "x"))
        return await ready(queue)

    assert asyncio.run(run()).token_ids == [7]


def test_ready_raises_a_failed_steps_error_over_the_tokens_before_it():
    async def run():
        return await ready(_queued(Event([1], "a"), Event([], "", error=Overloaded("full"))))

    with pytest.raises(Overloaded, match="full"):
        asyncio.run(run())


def test_interleave_tags_each_event_with_its_stream_and_ends_when_all_have():
    out = _collect(interleave([_tokens(3), _tokens(1), _tokens(2)]))
    assert sorted((i, e.token_ids[0]) for i, e in out) == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1)]
    for index in range(3):  # each stream's own order is kept
        assert [e.token_ids[0] for i, e in out if i == index] == sorted(e.token_ids[0] for i, e in out if i == index)


def test_interleave_raises_a_streams_error_and_closes_the_others():
    closed = []

    async def endless():
        try:
            while True:
                await asyncio.sleep(0.001)
                yield Event(token_ids=[1], text="x")
        finally:
            closed.append(True)

    async def failing():
        await asyncio.sleep(0.01)
        raise Overloaded("full")
        yield  # an async generator

    async def run():
        async for _ in interleave([endless(), failing()]):
            pass

    with pytest.raises(Overloaded, match="full"):
        asyncio.run(run())
    assert closed == [True]


def test_interleave_of_one_stream_passes_its_events_through():
    out = _collect(interleave([_tokens(3)]))
    assert [(i, e.token_ids) for i, e in out] == [(0, [0]), (0, [1]), (0, [2])]
