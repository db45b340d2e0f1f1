"""The ``CacheStore`` protocol every cache backend implements.

A store keeps values under string keys with an optional TTL, and offers a lock per key with a
TTL, so that concurrent identical requests, in one process or in many sharing the store, make one
upstream call (see ``single_flight``). Waiting for another holder is done by polling ``get`` with
a short, growing backoff, which every backend supports as is; a lock's TTL means a crashed holder
delays others by at most that long, and the holder refreshes it while it works.

Stores raise ``CacheError``s (``CacheBackendError`` when the backend fails, ``CacheEntryError``
for an unreadable value) rather than hiding them; ``ChatCompletionCache`` turns them into a miss
and a ``CacheStoreError`` event.
"""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

__all__ = ["CacheStore", "LockingStore"]

T = TypeVar("T")


class CacheStore(Protocol[T]):
    @property
    def name(self) -> str:
        """Short backend name for events and logs ("memory", "disk", "redis")."""
        ...

    async def get(self, key: str) -> T | None:
        """The value under ``key``, or None if absent or expired."""
        ...

    async def set(self, key: str, value: T, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, expiring after ``ttl`` seconds (None: never)."""
        ...

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        """Take the lock of ``key`` for ``ttl`` seconds; return an owner token, or None if held."""
        ...

    async def refresh_lock(self, key: str, token: str, ttl: float) -> bool:
        """Extend a lock we hold to ``ttl`` seconds from now; False if it is no longer ours."""
        ...

    async def release_lock(self, key: str, token: str) -> None:
        """Drop the lock if ``token`` still owns it (an expired, retaken lock is left alone)."""
        ...


@runtime_checkable
class LockingStore(CacheStore[T], Protocol[T]):
    """A store that can read-or-lock and write-and-unlock in one round trip each (``RedisStore``,
    by Lua scripts): a cache miss then costs two round trips instead of five (get, lock, get, set,
    unlock). Single-flight and the cache use these when a store has them; their meaning is exactly
    that of the calls they stand for, in order, with nothing between them."""

    async def get_or_lock(self, key: str, ttl: float) -> tuple[T | None, str | None]:
        """``key``'s value if there is one; else its lock for ``ttl`` seconds if free. Returns
        (value, None), (None, owner token), or (None, None): no value, and the lock is held."""
        ...

    async def set_and_release_lock(self, key: str, value: T, ttl: float | None, token: str) -> None:
        """``set(key, value, ttl)`` then ``release_lock(key, token)``."""
        ...
