"""A worker process that is to be SIGKILLed between the cache write and the ledger write: it runs a
chunk whose results stay buffered (the writer flushes only after an hour or a million records), so
every answer it gets is paid upstream and cached, and none reaches the ledger.

Run as ``python -m tests.workers.crash_before_ledger DATABASE_URL REDIS_URL PREFIX BASE_URL ID,ID,...``.
"""

from __future__ import annotations

import asyncio
import sys

from models.cache import RedisStore
from models.retry import RetryPolicy
from store import make_engine
from workers.clients import openai_client_factory
from workers.pipeline import ModelCallPipeline
from workers.rate_limits import LocalRateLimiter
from workers.runner import ChunkRunner, RunnerConfig

LEASE_SECONDS = 1  # so that the redo may claim the requests a moment after the kill


async def main(database_url: str, redis_url: str, prefix: str, base_url: str, ids: list[str]) -> None:
    pipeline = ModelCallPipeline(
        openai_client_factory(base_url=base_url, api_key="sim", timeout=30),
        LocalRateLimiter({}),
        RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05),
        cache_store=RedisStore.from_url(redis_url, prefix),
    )
    config = RunnerConfig(
        owner="doomed-worker", lease_seconds=LEASE_SECONDS, flush_size=1_000_000, flush_interval=3600
    )
    await ChunkRunner(make_engine(database_url), pipeline, config).run(ids)


if __name__ == "__main__":
    db_url, cache_url, key_prefix, sim_url, id_list = sys.argv[1:6]
    asyncio.run(main(db_url, cache_url, key_prefix, sim_url, id_list.split(",")))
