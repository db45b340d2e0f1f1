"""The cache end to end: the OpenAI client over real HTTP to the simulator, real stores, and
single-flight across two processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import diskcache
import pytest
import redis.asyncio

from models.cache import CHAT_CACHE_VALUE_TYPE, ChatCompletionCache, DiskCacheStore, RedisStore
from models.openai import OpenAIChatCompletionClient
from models.types import CreateResult, UserMessage
from simulator.testing import SimulatorServer

REPO = Path(__file__).resolve().parents[2]


def client_for(
    simulator: SimulatorServer, model: str = "gpt-4o", **kwargs: Any
) -> OpenAIChatCompletionClient:
    return OpenAIChatCompletionClient(model=model, base_url=simulator.base_url, api_key="sim", **kwargs)


def ask(text: str = "Hello, how are you?") -> list[UserMessage]:
    return [UserMessage(content=text, source="user")]


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_seed_example_with_the_disk_store(simulator: SimulatorServer, tmp_path: Path) -> None:
    disk = diskcache.Cache(str(tmp_path / "cache"))
    openai_client = client_for(simulator)
    cache_store = DiskCacheStore[CHAT_CACHE_VALUE_TYPE](disk)
    cache_client = ChatCompletionCache(openai_client, cache_store)
    try:
        response = await cache_client.create(ask())
        assert not response.cached
        inner_usage = openai_client.total_usage()
        hit = await cache_client.create(ask())
    finally:
        await cache_client.close()
        disk.close()
    assert hit.cached
    assert hit.content == response.content
    assert hit.usage == response.usage
    assert response.usage.prompt_tokens > 0
    assert openai_client.total_usage() == inner_usage
    assert cache_client.actual_usage() == response.usage
    assert simulator.stats()["completions"] == 1


async def test_seed_example_with_the_redis_store(
    simulator: SimulatorServer, redis_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    openai_client = client_for(simulator)
    cache_store = RedisStore[CHAT_CACHE_VALUE_TYPE](redis_client, prefix=redis_prefix)
    cache_client = ChatCompletionCache(openai_client, cache_store, ttl=60)
    try:
        response = await cache_client.create(ask())
        hit = await cache_client.create(ask())
        chunks: list[str] = []
        streamed: CreateResult | None = None
        async for item in cache_client.create_stream(ask()):
            if isinstance(item, CreateResult):
                streamed = item
            else:
                chunks.append(item)
    finally:
        await cache_client.close()
    assert not response.cached
    assert hit.cached
    assert hit.content == response.content
    assert hit.usage == response.usage
    assert streamed is not None
    assert streamed.cached
    assert "".join(chunks) == response.content
    assert simulator.stats()["completions"] == 1
    assert 0 < await redis_client.pttl(cache_store.entry_key(cache_client.cache_key(ask()))) <= 60_000


async def test_models_and_endpoints_never_share_entries(simulator: SimulatorServer) -> None:
    local_url = simulator.base_url.replace("127.0.0.1", "localhost")
    clients = [
        client_for(simulator, model="gpt-4o"),
        client_for(simulator, model="gpt-4o-mini"),
        OpenAIChatCompletionClient(model="gpt-4o", base_url=local_url, api_key="sim"),
        client_for(simulator, model="gpt-4o", temperature=0.5),
    ]
    store = DiskCacheStore[CHAT_CACHE_VALUE_TYPE](diskcache.Cache())  # a temporary directory
    caches = [ChatCompletionCache(client, store) for client in clients]
    try:
        first = [await cache.create(ask()) for cache in caches]
        again = [await cache.create(ask()) for cache in caches]
    finally:
        for cache in caches:
            await cache.close()
        store.cache.close()
    assert [result.cached for result in first] == [False] * 4
    assert [result.cached for result in again] == [True] * 4
    assert first[0].content != first[1].content
    assert simulator.stats()["completions"] == 4


async def test_a_secret_key_changes_nothing(simulator: SimulatorServer) -> None:
    one = ChatCompletionCache(client_for(simulator))
    other = OpenAIChatCompletionClient(model="gpt-4o", base_url=simulator.base_url, api_key="another-key")
    assert one.cache_key(ask()) == ChatCompletionCache(other).cache_key(ask())
    assert "sim" not in json.dumps(dict(one.cache_identity), default=str).replace("simulator", "")
    await one.close()
    await other.close()


def _run_workers(
    store: str, location: str, prefix: str, simulator: SimulatorServer
) -> list[dict[str, object]]:
    start_at = time.time() + 4.0  # both processes import and connect first, then fire together
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.models.cache_flight_worker",
                store,
                location,
                prefix,
                simulator.base_url,
                "25",
                str(start_at),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err.decode()
        reports.append(json.loads(out))
    return reports


@pytest.mark.parametrize("store", ["redis", "disk"])
def test_fifty_requests_from_two_processes_make_one_upstream_call(
    store: str, simulator: SimulatorServer, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    location = redis_url if store == "redis" else str(tmp_path / "shared-cache")
    reports = _run_workers(store, location, redis_prefix, simulator)
    stats = simulator.stats()
    assert stats["completions"] == 1
    assert sum(int(str(report["results"])) for report in reports) == 50
    assert sum(int(str(report["upstream"])) for report in reports) == 1
    assert len({content for report in reports for content in report["contents"]}) == 1  # type: ignore[attr-defined]


async def test_a_waiter_waits_for_a_live_holder_past_the_single_flight_timeout(
    simulator: SimulatorServer, redis_url: str, redis_prefix: str
) -> None:
    """The holder's call takes longer (4 s) than the waiter's ``single_flight_timeout`` (0.3 s)
    and several lock TTLs (1.5 s): the waiter, another process's cache on the same Redis, keeps
    waiting while the holder's lock is alive and is served its answer: one upstream call. (A TTL
    of 0.6 s lapsed at load 25, when the holder's event loop stalled past it before a refresh.)"""
    simulator.configure(latency_ms=4000)
    stores = [RedisStore[CHAT_CACHE_VALUE_TYPE].from_url(redis_url, prefix=redis_prefix) for _ in range(2)]
    holder, waiter = (
        ChatCompletionCache(client_for(simulator), store, single_flight_timeout=0.3, lock_ttl=1.5)
        for store in stores
    )
    try:
        holding = asyncio.create_task(holder.create(ask()))
        deadline = time.monotonic() + 10
        while simulator.stats()["in_flight"] == 0:  # the holder has its lock and is upstream
            assert time.monotonic() < deadline, "the holder never went upstream"
            await asyncio.sleep(0.01)
        waited = await asyncio.wait_for(waiter.create(ask()), timeout=30)
        held = await holding
    finally:
        await holder.close()
        await waiter.close()
        for store in stores:
            await store.close()
    assert held.cached is False
    assert waited.cached is True
    assert simulator.stats()["completions"] == 1
    assert waiter.actual_usage().total_tokens == 0
