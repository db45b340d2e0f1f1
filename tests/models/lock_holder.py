"""A process that takes single-flight locks and never lets go: it asks the cache for N prompts
through a client that never answers, so it holds the N keys' locks (refreshed by its heartbeat)
until it is killed.

Run as ``python -m tests.models.lock_holder REDIS_URL PREFIX N``.
"""

from __future__ import annotations

import asyncio
import sys

from models.cache import ChatCompletionCache, RedisStore
from models.types import UserMessage
from tests.models.counting_client import CountingClient


def lock_holder_messages(index: int) -> list[UserMessage]:
    return [UserMessage(content=f"held prompt {index}", source="user")]


async def main(url: str, prefix: str, count: int) -> None:
    store = RedisStore.from_url(url, prefix=prefix)
    cache = ChatCompletionCache(CountingClient(delay=3600), store)
    await asyncio.gather(*(cache.create(lock_holder_messages(i)) for i in range(count)))


if __name__ == "__main__":
    redis_url, key_prefix, n = sys.argv[1:4]
    asyncio.run(main(redis_url, key_prefix, int(n)))
