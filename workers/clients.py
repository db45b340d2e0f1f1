"""Building a worker's model-call pipeline from the settings, once per event loop.

Upstream clients come from the provider named by ``TOKENMILL_PROVIDER`` (``models.providers``),
with credentials from that provider's own environment variables (``OPENAI_BASE_URL`` /
``OPENAI_API_KEY`` for ``openai``, as the SDK reads them) or given here; the limiter is the shared
Redis one when a broker is configured, else the in-process one; the cache is ``RedisStore`` for a
``redis://`` cache URL, else a ``diskcache`` directory.
"""

from __future__ import annotations

from collections.abc import Mapping

import diskcache

from config import Settings
from models.cache import CachedCompletion, CacheStore, DiskCacheStore, RedisStore
from models.providers import ProviderOptions, provider_client_factory
from models.retry import RetryPolicy
from workers.pipeline import ClientFactory, ModelCallPipeline
from workers.rate_limits import (
    LimiterTuning,
    LocalRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    SplitRateLimiter,
)

__all__ = ["build_pipeline", "cache_store", "limiter_for", "openai_client_factory"]


def openai_client_factory(
    *, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0
) -> ClientFactory:
    """The ``openai`` provider's clients, at ``base_url`` with ``api_key`` when given."""
    given = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": api_key}
    env = {name: value for name, value in given.items() if value is not None}
    return provider_client_factory("openai", ProviderOptions(timeout=timeout, env=env))


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
    may override the provider's environment variables (``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``).
    Raises ``UnknownProvider`` when ``settings.provider`` names none."""
    factory = client_factory or provider_client_factory(
        settings.provider,
        ProviderOptions(timeout=settings.upstream_timeout_seconds, env=dict(client_env or {})),
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
