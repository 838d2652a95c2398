import asyncio

from cluster.engine import Event
from cluster.stream import every


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
