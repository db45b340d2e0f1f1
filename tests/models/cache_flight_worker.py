"""One process of the cross-process single-flight test: N concurrent identical requests through a
``ChatCompletionCache`` on a shared store, against the simulator; prints how many were hits.

Run as ``python -m tests.models.cache_flight_worker STORE LOCATION PREFIX BASE_URL N START_AT``,
where STORE is ``redis`` (LOCATION a URL) or ``disk`` (LOCATION a directory) and START_AT a
``time.time()`` at which to fire, so two processes started apart still collide.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import diskcache

from models.cache import CachedCompletion, CacheStore, ChatCompletionCache, DiskCacheStore, RedisStore
from models.openai import OpenAIChatCompletionClient
from models.types import UserMessage

PROMPT = "single flight across processes [[delay 1.0]]"


async def main(
    store_kind: str, location: str, prefix: str, base_url: str, count: int, start_at: float
) -> None:
    store: CacheStore[CachedCompletion]
    disk: diskcache.Cache | None = None
    if store_kind == "redis":
        store = RedisStore.from_url(location, prefix=prefix, timeout=2.0)
    else:
        disk = diskcache.Cache(location)
        store = DiskCacheStore(disk, prefix)
    client = OpenAIChatCompletionClient(model="gpt-4o-mini", base_url=base_url, api_key="sim")
    cache = ChatCompletionCache(client, store)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    results = await asyncio.gather(
        *(cache.create([UserMessage(content=PROMPT, source="user")]) for _ in range(count))
    )
    await cache.close()
    if isinstance(store, RedisStore):
        await store.close()
    if disk is not None:
        disk.close()
    print(
        json.dumps(
            {
                "results": len(results),
                "upstream": sum(not result.cached for result in results),
                "contents": sorted({str(result.content) for result in results}),
            }
        )
    )


if __name__ == "__main__":
    kind, where, key_prefix, url, n, at = sys.argv[1:7]
    asyncio.run(main(kind, where, key_prefix, url, int(n), float(at)))
