"""The response cache: ``ChatCompletionCache`` wraps any model client; stores keep its entries.

``InMemoryStore`` (one process), ``DiskCacheStore`` (one machine, a ``diskcache`` directory) and
``RedisStore`` (every machine) implement the ``CacheStore`` protocol, including the per-key lock
that single-flight uses. Errors are drawn in ``models.cache.errors``.
"""

from models.cache.base import CacheStore
from models.cache.client import ChatCompletionCache, announcing_hits, paying_as
from models.cache.disk import DiskCacheStore
from models.cache.entry import (
    CACHED_COMPLETION_CODEC,
    CHAT_CACHE_VALUE_TYPE,
    ENTRY_FORMAT_VERSION,
    CachedCompletion,
    CachedCompletionCodec,
    ValueCodec,
)
from models.cache.errors import CacheBackendError, CacheEntryError, CacheError, UncacheableRequestError
from models.cache.keys import KEY_FORMAT_VERSION, canonical_json, request_key
from models.cache.memory import InMemoryStore
from models.cache.redis import RedisStore
from models.cache.single_flight import DEFAULT_LOCK_TTL, Flight, SingleFlight

__all__ = [
    "CACHED_COMPLETION_CODEC",
    "CHAT_CACHE_VALUE_TYPE",
    "DEFAULT_LOCK_TTL",
    "ENTRY_FORMAT_VERSION",
    "KEY_FORMAT_VERSION",
    "CacheBackendError",
    "CacheEntryError",
    "CacheError",
    "CacheStore",
    "CachedCompletion",
    "CachedCompletionCodec",
    "ChatCompletionCache",
    "DiskCacheStore",
    "Flight",
    "InMemoryStore",
    "RedisStore",
    "SingleFlight",
    "UncacheableRequestError",
    "ValueCodec",
    "announcing_hits",
    "canonical_json",
    "paying_as",
    "request_key",
]
