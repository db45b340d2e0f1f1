"""Cache hits per second from Redis in one process, against raw ``redis.asyncio`` GETs.

``python -m bench.cache_hits [--redis-url URL] [--seconds S] [--concurrency C]``

Stores one realistic entry (a ~1 KB answer plus the provider's raw body) through a
``ChatCompletionCache`` on a ``RedisStore``, then for ``--seconds`` each:

- baseline: raw ``GET`` of the same stored bytes through the same ``redis.asyncio`` client;
- hits: ``ChatCompletionCache.create`` of the cached request (key hashing, the read, decode,
  copy, usage tally, ``CacheHit`` event with its logger off), on a ``RedisStore`` as workers build
  it (the lookups in flight together share one ``MGET`` per event-loop turn), and for comparison on
  one built with ``batch_reads=False`` (a ``GET`` per lookup, as before);

each with ``--concurrency`` coroutines in flight, in alternating rounds (the median is printed,
so load from elsewhere on the machine falls on both), and prints both rates and their ratio. Then the
same for a ``DiskCacheStore``, inline and with ``in_thread=True``, which is how the disk store's
default was chosen. Keys live under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import diskcache
import redis.asyncio
from pydantic import BaseModel

from models.base import ChatCompletionClient
from models.cache import CachedCompletion, CacheStore, ChatCompletionCache, DiskCacheStore, RedisStore
from models.cancellation import CancellationToken
from models.types import (
    CreateResult,
    LLMMessage,
    ModelInfo,
    RequestUsage,
    Tool,
    ToolChoice,
    ToolSchema,
    UserMessage,
)

MESSAGES: list[LLMMessage] = [
    UserMessage(content="Summarise the plot of Hamlet in one paragraph.", source="user")
]
HIT_TARGET = 0.9  # issue 13: hits per second over raw GETs per second, at least
ANSWER = ("Prince Hamlet seeks revenge on his uncle Claudius, who murdered his father. " * 14).strip()


class FixedAnswerClient(ChatCompletionClient):
    """Answers once with a fixed result (the entry being hit); a hit never reaches it again."""

    def __init__(self) -> None:
        self.calls = 0

    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> CreateResult:
        self.calls += 1
        usage = RequestUsage(prompt_tokens=20, completion_tokens=len(ANSWER) // 4)
        return CreateResult(
            finish_reason="stop",
            content=ANSWER,
            usage=usage,
            cached=False,
            model="gpt-4o-mini-2024-07-18",
            response_id="chatcmpl-bench",
            raw_response={
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": ANSWER}}
                ],
                "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
            },
        )

    async def create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        yield await self.create(messages)

    async def close(self) -> None:
        pass

    def actual_usage(self) -> RequestUsage:
        return RequestUsage()

    def total_usage(self) -> RequestUsage:
        return RequestUsage()

    def count_tokens(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = ()) -> int:
        return 0

    def remaining_tokens(
        self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = ()
    ) -> int:
        return 0

    @property
    def model_info(self) -> ModelInfo:
        return {"vision": False, "function_calling": False, "json_output": False, "family": "unknown"}

    @property
    def cache_identity(self) -> Mapping[str, Any]:
        return {"provider": "bench", "endpoint": "bench.invalid", "model": "gpt-4o-mini"}


async def rate(operation: Callable[[], Awaitable[object]], seconds: float, concurrency: int) -> float:
    """Operations per second with ``concurrency`` coroutines looping for ``seconds``."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await operation()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def rates(
    operations: Sequence[Callable[[], Awaitable[object]]], seconds: float, concurrency: int, rounds: int = 3
) -> list[float]:
    """The median rate of each operation over ``rounds`` alternating runs sharing ``seconds``, so
    that load from other processes on the machine hits the baseline and the measured alike."""
    measured: list[list[float]] = [[] for _ in operations]
    for _ in range(rounds):
        for index, operation in enumerate(operations):
            measured[index].append(await rate(operation, seconds / rounds, concurrency))
    return [statistics.median(each) for each in measured]


async def cache_with_entry(store: CacheStore[CachedCompletion]) -> ChatCompletionCache:
    inner = FixedAnswerClient()
    cache = ChatCompletionCache(inner, store)
    await cache.create(MESSAGES)
    hit = await cache.create(MESSAGES)
    assert hit.cached
    assert inner.calls == 1
    return cache


async def bench_redis(url: str, seconds: float, concurrency: int) -> None:
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    client = redis.asyncio.Redis.from_url(url, max_connections=concurrency + 4)
    try:
        cache = await cache_with_entry(RedisStore(client, prefix))
        unbatched = ChatCompletionCache(FixedAnswerClient(), RedisStore(client, prefix, batch_reads=False))
        raw_key = prefix + cache.cache_key(MESSAGES)
        payload = await client.get(raw_key)
        assert payload is not None
        assert (await unbatched.create(MESSAGES)).cached

        async def raw_get() -> object:
            return await client.get(raw_key)

        async def hit() -> object:
            return await cache.create(MESSAGES)

        async def unbatched_hit() -> object:
            return await unbatched.create(MESSAGES)

        await rate(raw_get, 0.3, concurrency)  # warm the connection pool
        baseline, hits, unbatched_hits = await rates([raw_get, hit, unbatched_hit], seconds, concurrency)
        print(
            f"redis  entry {len(payload)} bytes, {concurrency} in flight, {seconds:.0f} s, median of 3 rounds"
        )
        print(f"  raw redis.asyncio GET        {baseline:10,.0f} /s   (baseline)")
        ratio = hits / baseline
        verdict = "met" if ratio >= HIT_TARGET else "NOT met"
        print(
            f"  ChatCompletionCache hits     {hits:10,.0f} /s   ({ratio:.2f} x baseline; "
            f"target >= {HIT_TARGET} x: {verdict})"
        )
        print(
            f"  hits, batch_reads=False      {unbatched_hits:10,.0f} /s   "
            f"({unbatched_hits / baseline:.2f} x baseline: a GET per lookup)"
        )
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()  # type: ignore[attr-defined, unused-ignore]  # types-redis predates aclose


async def bench_disk(seconds: float, concurrency: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as directory:
        disk = diskcache.Cache(directory)
        try:
            inline = await cache_with_entry(DiskCacheStore(disk))
            threaded = ChatCompletionCache(FixedAnswerClient(), DiskCacheStore(disk, in_thread=True))
            raw_key = "tokenmill:cache:" + inline.cache_key(MESSAGES)

            async def raw_get() -> object:
                return disk.get(raw_key)

            async def inline_hit() -> object:
                return await inline.create(MESSAGES)

            async def threaded_hit() -> object:
                return await threaded.create(MESSAGES)

            baseline, inline_rate, threaded_rate = await rates(
                [raw_get, inline_hit, threaded_hit], seconds, concurrency
            )
            print(f"disk   {concurrency} in flight, {seconds:.0f} s, median of 3 rounds")
            print(f"  raw diskcache get            {baseline:10,.0f} /s   (baseline)")
            for label, measured in (("inline (default)", inline_rate), ("in_thread=True", threaded_rate)):
                print(f"  hits, {label:<22} {measured:10,.0f} /s   ({measured / baseline:.2f} x baseline)")
        finally:
            disk.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--redis-url", default=os.environ.get("TOKENMILL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(bench_redis(args.redis_url, args.seconds, args.concurrency))
    asyncio.run(bench_disk(args.seconds, args.concurrency))


if __name__ == "__main__":
    main()
