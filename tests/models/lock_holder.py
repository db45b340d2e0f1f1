"""A process that takes single-flight locks and never lets go: it asks the cache for N prompts
through a client that never answers, so it holds the N keys' locks (refreshed by its heartbeat)
until it is killed. It prints ``locked`` once all N are held.

Run as ``python -m tests.models.lock_holder STORE LOCATION PREFIX N``, STORE being ``redis``
(LOCATION a URL) or ``disk`` (LOCATION a directory).
"""

from __future__ import annotations

import asyncio
import sys

import diskcache

from models.cache import CachedCompletion, CacheStore, ChatCompletionCache, DiskCacheStore, RedisStore
from models.types import UserMessage
from tests.models.counting_client import CountingClient


def lock_holder_messages(index: int) -> list[UserMessage]:
    return [UserMessage(content=f"held prompt {index}", source="user")]


def open_store(kind: str, location: str, prefix: str) -> CacheStore[CachedCompletion]:
    if kind == "redis":
        return RedisStore.from_url(location, prefix=prefix)
    return DiskCacheStore(diskcache.Cache(location), prefix)


async def main(kind: str, location: str, prefix: str, count: int) -> None:
    store = open_store(kind, location, prefix)
    cache = ChatCompletionCache(CountingClient(delay=3600), store)
    calls = [asyncio.ensure_future(cache.create(lock_holder_messages(i))) for i in range(count)]
    keys = [cache.cache_key(lock_holder_messages(i)) for i in range(count)]

    async def all_held() -> bool:
        # A lock the cache holds cannot be taken; one that can is given straight back.
        free = False
        for key in keys:
            token = await store.acquire_lock(key, ttl=1.0)
            if token is not None:
                free = True
                await store.release_lock(key, token)
        return not free

    for _ in range(3000):  # a minute
        if await all_held():
            print("locked", flush=True)
            break
        await asyncio.sleep(0.02)
    await asyncio.gather(*calls)


if __name__ == "__main__":
    store_kind, where, key_prefix, n = sys.argv[1:5]
    asyncio.run(main(store_kind, where, key_prefix, int(n)))
