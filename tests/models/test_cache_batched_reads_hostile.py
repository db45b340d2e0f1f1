"""A cache entry no reader can parse fails only its own ``get``, even when it shares an ``MGET``
with other tenants' lookups (``models.cache.redis``), on a client that decodes its replies.

``RedisStore`` takes a client as configured, and reads the ``str`` a ``decode_responses=True``
client hands back. Such a client raises ``UnicodeDecodeError`` while it parses a reply that
holds bytes of no UTF-8 (an entry corrupted, or written by a writer of another encoding). Read
alone, that fails the one ``get``; read in one ``MGET`` with others, it was a non-Redis error of
the whole read, and every ``get`` of the batch (every tenant's lookup made in that turn) was
cancelled: callers that nobody cancelled got ``CancelledError`` (a lane call's task ends as
cancelled, its request left claimed until its lease lapses). Read alone (``batch_reads=False``),
it was a bare ``UnicodeDecodeError``, not the ``CacheEntryError`` (a miss) of an unreadable entry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from models.cache import CachedCompletion
from models.cache.redis import RedisStore
from tests.models.test_cache_stores import ENTRY


@pytest.fixture
async def decoding_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.mark.parametrize("batch_reads", [True, False])
async def test_an_undecodable_entry_in_one_mget_fails_its_own_get_alone(
    decoding_client: redis.asyncio.Redis, redis_url: str, redis_prefix: str, batch_reads: bool
) -> None:
    store: RedisStore[CachedCompletion] = RedisStore(
        decoding_client, prefix=redis_prefix, batch_reads=batch_reads
    )
    for n in range(3):
        await store.set(f"good-{n}", ENTRY)
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        await raw.set(store.entry_key("corrupt"), b"\xff\xfe not utf-8")
    finally:
        await raw.aclose()
    keys = ["good-0", "corrupt", "good-1", "good-2"]
    results = await asyncio.gather(*(store.get(key) for key in keys), return_exceptions=True)
    kinds = {key: type(result).__name__ for key, result in zip(keys, results, strict=True)}
    assert kinds == {
        "good-0": "CachedCompletion",
        "corrupt": "CacheEntryError",
        "good-1": "CachedCompletion",
        "good-2": "CachedCompletion",
    }
    assert results[0] == results[2] == results[3] == ENTRY
    # The store (and its connections) still answers afterwards.
    assert await asyncio.gather(*(store.get(f"good-{n}") for n in range(3))) == [ENTRY] * 3
