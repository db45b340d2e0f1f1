"""Each CacheStore against its real backend: values, TTLs, locks, unreadable entries, outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import diskcache
import pytest
import redis.asyncio

from models.cache import (
    CHAT_CACHE_VALUE_TYPE,
    CacheBackendError,
    CachedCompletion,
    CacheEntryError,
    CacheStore,
    DiskCacheStore,
    InMemoryStore,
    RedisStore,
)
from models.cache.redis import MAX_KEYS_PER_READ
from models.types import CreateResult, RequestUsage
from tests.models.counting_connection import CountingConnection
from tests.services import free_port

ENTRY = CachedCompletion(
    result=CreateResult(
        finish_reason="stop",
        content="stored answer",
        usage=RequestUsage(prompt_tokens=3, completion_tokens=2),
        cached=False,
        model="m",
    ),
    chunks=["stored ", "answer"],
)


class RawBytes:
    """A codec that stores bytes as given: writes entries another version (or a bug) could leave."""

    def encode(self, value: bytes) -> bytes:
        return value

    def decode(self, data: bytes) -> bytes:
        return data


@pytest.fixture
def disk_cache(tmp_path: Path) -> Iterator[diskcache.Cache]:
    cache = diskcache.Cache(str(tmp_path / "cache"))
    yield cache
    cache.close()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "disk", "redis"])
def store(request: pytest.FixtureRequest) -> CacheStore[CachedCompletion]:
    if request.param == "memory":
        return InMemoryStore()
    if request.param == "disk":
        return DiskCacheStore(request.getfixturevalue("disk_cache"))
    prefix = request.getfixturevalue("redis_prefix")
    return RedisStore(request.getfixturevalue("redis_client"), prefix=prefix)


@pytest.fixture(params=["disk", "redis"])
def shared_pair(request: pytest.FixtureRequest) -> tuple[CacheStore[CachedCompletion], CacheStore[bytes]]:
    """A chat store and a raw-bytes store over the same backend and prefix."""
    if request.param == "disk":
        cache = request.getfixturevalue("disk_cache")
        return DiskCacheStore(cache), DiskCacheStore(cache, codec=RawBytes())
    client = request.getfixturevalue("redis_client")
    prefix = request.getfixturevalue("redis_prefix")
    return RedisStore(client, prefix), RedisStore(client, prefix, codec=RawBytes())


async def test_a_value_round_trips_and_a_missing_key_is_none(store: CacheStore[CachedCompletion]) -> None:
    assert await store.get("absent") is None
    await store.set("k", ENTRY)
    found = await store.get("k")
    assert found == ENTRY
    assert found is not ENTRY


async def test_ttl_expires_entries(store: CacheStore[CachedCompletion]) -> None:
    await store.set("short", ENTRY, ttl=0.2)
    await store.set("long", ENTRY, ttl=30)
    assert await store.get("short") == ENTRY
    await asyncio.sleep(0.35)
    assert await store.get("short") is None
    assert await store.get("long") == ENTRY


async def test_a_lock_has_one_owner_until_released(store: CacheStore[CachedCompletion]) -> None:
    token = await store.acquire_lock("k", ttl=10)
    assert token is not None
    assert await store.acquire_lock("k", ttl=10) is None
    await store.release_lock("k", "not-the-owner")
    assert await store.acquire_lock("k", ttl=10) is None
    await store.release_lock("k", token)
    again = await store.acquire_lock("k", ttl=10)
    assert again is not None
    assert again != token
    assert await store.acquire_lock("other-key", ttl=10) is not None


async def test_a_lock_expires_and_refresh_extends_it(store: CacheStore[CachedCompletion]) -> None:
    expiring = await store.acquire_lock("expiring", ttl=0.2)
    refreshed = await store.acquire_lock("refreshed", ttl=0.2)
    assert expiring is not None
    assert refreshed is not None
    await asyncio.sleep(0.1)
    assert await store.refresh_lock("refreshed", refreshed, ttl=1.0)
    assert not await store.refresh_lock("refreshed", "not-the-owner", ttl=1.0)
    await asyncio.sleep(0.25)
    taken_over = await store.acquire_lock("expiring", ttl=10)
    assert taken_over is not None
    assert await store.acquire_lock("refreshed", ttl=10) is None
    # The first owner's lock expired and was retaken: its late release must not free the new one.
    await store.release_lock("expiring", expiring)
    assert await store.acquire_lock("expiring", ttl=10) is None
    assert not await store.refresh_lock("expiring", expiring, ttl=10)


async def test_an_unreadable_entry_is_an_entry_error(
    shared_pair: tuple[CacheStore[CachedCompletion], CacheStore[bytes]],
) -> None:
    chat, raw = shared_pair
    await raw.set("garbage", b"\x00not json{")
    with pytest.raises(CacheEntryError, match="not JSON"):
        await chat.get("garbage")
    await raw.set("wrong-shape", b'{"format": 1, "result": {"content": 3}}')
    with pytest.raises(CacheEntryError, match="shape"):
        await chat.get("wrong-shape")


async def test_an_entry_of_another_format_version_is_an_entry_error(
    shared_pair: tuple[CacheStore[CachedCompletion], CacheStore[bytes]],
) -> None:
    chat, raw = shared_pair
    await chat.set("k", ENTRY)
    stored = await raw.get("k")
    assert stored is not None
    assert b'"format":1' in stored
    await raw.set("k", stored.replace(b'"format":1', b'"format":2'))
    with pytest.raises(CacheEntryError, match="format 2"):
        await chat.get("k")


async def test_stores_are_subscriptable_as_the_seed_writes_them(
    disk_cache: diskcache.Cache, redis_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    disk_store = DiskCacheStore[CHAT_CACHE_VALUE_TYPE](disk_cache)
    redis_store = RedisStore[CHAT_CACHE_VALUE_TYPE](redis_client, prefix=redis_prefix)
    for each in (disk_store, redis_store):
        await each.set("k", ENTRY)
        assert await each.get("k") == ENTRY


async def test_redis_store_keeps_everything_under_its_prefix(
    redis_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    store = RedisStore(redis_client, prefix=f"{redis_prefix}tenant-a:")
    other = RedisStore(redis_client, prefix=f"{redis_prefix}tenant-b:")
    await store.set("k", ENTRY, ttl=60)
    token = await store.acquire_lock("k", ttl=60)
    assert token is not None
    keys = sorted(k.decode() for k in await redis_client.keys(f"{redis_prefix}*"))
    assert keys == [f"{redis_prefix}tenant-a:k", f"{redis_prefix}tenant-a:lock:k"]
    assert 0 < await redis_client.pttl(f"{redis_prefix}tenant-a:k") <= 60_000
    assert await other.get("k") is None
    assert await other.acquire_lock("k", ttl=60) is not None


async def test_redis_store_reads_through_a_decoding_client(redis_url: str, redis_prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        store = RedisStore(client, prefix=redis_prefix)
        await store.set("k", ENTRY)
        assert await store.get("k") == ENTRY
        token = await store.acquire_lock("k", ttl=5)
        assert token is not None
        await store.release_lock("k", token)
        assert await store.acquire_lock("k", ttl=5) is not None
    finally:
        await client.aclose()


async def test_redis_store_on_a_closed_port_fails_fast_with_backend_errors() -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", outage_backoff=0.2)
    try:
        started = time.perf_counter()
        with pytest.raises(CacheBackendError) as raised:
            await store.get("k")
        assert raised.value.operation == "get"
        assert raised.value.store == "redis"
        # Inside the backoff window the store does not even try.
        with pytest.raises(CacheBackendError, match="unreachable moments ago"):
            await store.set("k", ENTRY)
        for call in (
            store.acquire_lock("k", 5),
            store.refresh_lock("k", "t", 5),
            store.release_lock("k", "t"),
        ):
            with pytest.raises(CacheBackendError):
                await call
        assert time.perf_counter() - started < 1.0
        await asyncio.sleep(0.25)
        with pytest.raises(CacheBackendError, match=r"ConnectionError|refused"):
            await store.get("k")
    finally:
        await store.close()


async def test_memory_store_evicts_the_least_recently_used() -> None:
    store = InMemoryStore(max_entries=2)
    await store.set("a", ENTRY)
    await store.set("b", ENTRY)
    assert await store.get("a") is not None
    await store.set("c", ENTRY)
    assert len(store) == 2
    assert await store.get("b") is None
    assert await store.get("a") is not None
    assert await store.get("c") is not None


@pytest.fixture
async def counted_redis(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    pool = redis.asyncio.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = redis.asyncio.Redis(connection_pool=pool)
    yield client
    await client.aclose()
    await pool.aclose()


def _reads(commands: list[str]) -> list[str]:
    return [name for name in commands if name.upper() in ("GET", "MGET")]


async def test_redis_store_answers_the_gets_of_one_turn_with_one_mget(
    counted_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """Gets made together are read together, up to MAX_KEYS_PER_READ keys an MGET; each caller
    gets its own key's value (or None), decoded for it alone."""
    store = RedisStore(counted_redis, prefix=redis_prefix)
    present = {f"k{i}" for i in range(0, 300, 3)}
    for key in sorted(present):
        await store.set(key, ENTRY)
    CountingConnection.commands = []
    values = await asyncio.gather(*(store.get(f"k{i}") for i in range(300)))
    assert [value is not None for value in values] == [f"k{i}" in present for i in range(300)]
    assert all(value == ENTRY for value in values if value is not None)
    assert len({id(value) for value in values if value is not None}) == len(present)
    assert _reads(CountingConnection.commands) == ["MGET"] * -(-300 // MAX_KEYS_PER_READ)
    CountingConnection.commands = []
    assert await store.get("k0") == ENTRY  # alone: a plain GET
    assert _reads(CountingConnection.commands) == ["GET"]


async def test_redis_store_reads_one_get_at_a_time_when_asked(
    counted_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    store = RedisStore(counted_redis, prefix=redis_prefix, batch_reads=False)
    await store.set("k", ENTRY)
    CountingConnection.commands = []
    assert await asyncio.gather(*(store.get("k") for _ in range(4))) == [ENTRY] * 4
    assert _reads(CountingConnection.commands) == ["GET"] * 4


async def test_a_get_cancelled_while_its_read_is_out_leaves_the_others_their_values(
    redis_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    store = RedisStore(redis_client, prefix=redis_prefix)
    await store.set("k", ENTRY)
    gets = [asyncio.ensure_future(store.get("k")) for _ in range(3)]
    for _ in range(3):  # every get joins the read, which is then sent
        await asyncio.sleep(0)
    gets[1].cancel()
    done = await asyncio.gather(*gets, return_exceptions=True)
    assert done[0] == done[2] == ENTRY
    assert isinstance(done[1], asyncio.CancelledError)
    assert await store.get("k") == ENTRY


async def test_every_get_of_a_failed_read_gets_its_own_backend_error() -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", outage_backoff=0.2)
    try:
        errors = await asyncio.gather(*(store.get(f"k{i}") for i in range(5)), return_exceptions=True)
    finally:
        await store.close()
    assert all(isinstance(error, CacheBackendError) for error in errors)
    assert {error.operation for error in errors if isinstance(error, CacheBackendError)} == {"get"}
    assert len({id(error) for error in errors}) == 5
