"""Building a worker's model-call pipeline from the settings, once per event loop.

Upstream clients are OpenAI-protocol clients (``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` as the SDK
reads them, or given here); the limiter is the shared Redis one when a broker is configured, else
the in-process one; the cache is ``RedisStore`` for a ``redis://`` cache URL, else a ``diskcache``
directory.
"""

from __future__ import annotations

from collections.abc import Mapping

import diskcache

from config import Settings
from models.base import ChatCompletionClient
from models.cache import CachedCompletion, CacheStore, DiskCacheStore, RedisStore
from models.openai import OpenAIChatCompletionClient
from models.retry import RetryPolicy
from workers.limiter import LimiterTuning, LocalRateLimiter, RateLimiter, RedisRateLimiter, SplitRateLimiter
from workers.pipeline import ClientFactory, ModelCallPipeline

__all__ = ["build_pipeline", "cache_store", "limiter_for", "openai_client_factory"]


def openai_client_factory(
    *, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0
) -> ClientFactory:
    def make(model: str) -> ChatCompletionClient:
        return OpenAIChatCompletionClient(model=model, base_url=base_url, api_key=api_key, timeout=timeout)

    return make


_process_limiter: LocalRateLimiter | None = None


def _local_limiter(settings: Settings, tuning: LimiterTuning) -> LocalRateLimiter:
    """One per process, across chunks (it holds no loop-bound object), so its AIMD cap lasts."""
    global _process_limiter
    if _process_limiter is None or _process_limiter.limits != settings.limits:
        _process_limiter = LocalRateLimiter(settings.limits, tuning)
    return _process_limiter


def limiter_for(settings: Settings, tuning: LimiterTuning | None = None) -> RateLimiter:
    tuning = tuning or LimiterTuning(
        lease_seconds=settings.upstream_timeout_seconds + 30,
        max_wait_seconds=settings.hand_back_after_seconds,
    )
    local = _local_limiter(settings, tuning)
    if settings.broker_url is None:
        return local
    shared = RedisRateLimiter.from_url(
        settings.broker_url, settings.limits, key_prefix=settings.key_prefix, tuning=tuning
    )
    return SplitRateLimiter(shared, local)


def cache_store(settings: Settings) -> CacheStore[CachedCompletion]:
    if settings.cache_is_redis:
        return RedisStore.from_url(
            settings.cache_url, settings.cache_prefix, timeout=settings.cache_timeout_seconds
        )
    return DiskCacheStore(diskcache.Cache(settings.cache_url), settings.cache_prefix, in_thread=True)


def build_pipeline(
    settings: Settings,
    *,
    client_factory: ClientFactory | None = None,
    limiter: RateLimiter | None = None,
    cache: CacheStore[CachedCompletion] | bool | None = True,
    client_env: Mapping[str, str] | None = None,
) -> ModelCallPipeline:
    """A pipeline for the running event loop. ``cache=False`` turns the cache off; ``client_env``
    may carry ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` overrides."""
    env = client_env or {}
    factory = client_factory or openai_client_factory(
        base_url=env.get("OPENAI_BASE_URL"),
        api_key=env.get("OPENAI_API_KEY"),
        timeout=settings.upstream_timeout_seconds,
    )
    store: CacheStore[CachedCompletion] | None
    if cache is True:
        store = cache_store(settings)
    elif cache is False or cache is None:
        store = None
    else:
        store = cache
    return ModelCallPipeline(
        factory,
        limiter or limiter_for(settings),
        RetryPolicy(max_attempts=settings.max_attempts, hand_back_after=settings.hand_back_after_seconds),
        cache_store=store,
        cache_ttl=settings.cache_ttl_seconds,
        cache_scope=settings.cache_scope,
        cache_lock_ttl=settings.cache_lock_ttl_seconds,
    )
