"""Fixtures of the worker tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis

from tests.workers.support import Ledger, ledger
from workers.lane_transport import LaneTransport


@pytest.fixture
def make_ledger() -> Iterator[Callable[[str], Ledger]]:
    """``make_ledger(url)``: schema at head, one tenant; its engine is disposed at teardown."""
    made: list[Ledger] = []

    def make(url: str) -> Ledger:
        made.append(ledger(url))
        return made[-1]

    yield make
    for led in made:
        led.engine.dispose()


@pytest.fixture
async def transport(redis_url: str, redis_prefix: str) -> AsyncIterator[LaneTransport]:
    """The lane's Redis side on the test's own Redis and key prefix."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield LaneTransport(client, redis_prefix)
    finally:
        await client.aclose()
