"""``DiskCacheStore``: a ``diskcache.Cache`` directory, shared by every process on one machine.

diskcache is SQLite plus files, safe across processes; its ``add`` is atomic, so the lock of a key
is an entry added with an expiry (like ``diskcache.Lock``, but with an owner token so a holder
whose lock expired and was retaken never deletes the new holder's lock). Calls are quick local I/O
and run inline by default (``bench/cache_hits.py`` measures both ways); pass ``in_thread=True`` to
move them to a worker thread if the directory sits on slow storage.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

import diskcache

from models.cache.entry import CACHED_COMPLETION_CODEC, CachedCompletion, ValueCodec
from models.cache.errors import CacheBackendError

__all__ = ["DiskCacheStore"]

T = TypeVar("T")
R = TypeVar("R")

_DISK_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)


class DiskCacheStore(Generic[T]):
    """Entries under ``prefix + key`` in ``cache``; locks under ``prefix + "lock:" + key``."""

    @overload
    def __init__(
        self: DiskCacheStore[CachedCompletion],
        cache: diskcache.Cache,
        prefix: str = "tokenmill:cache:",
        *,
        in_thread: bool = False,
        codec: None = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        cache: diskcache.Cache,
        prefix: str = "tokenmill:cache:",
        *,
        in_thread: bool = False,
        codec: ValueCodec[T],
    ) -> None: ...

    def __init__(
        self,
        cache: diskcache.Cache,
        prefix: str = "tokenmill:cache:",
        *,
        in_thread: bool = False,
        codec: ValueCodec[T] | None = None,
    ) -> None:
        self._cache = cache
        self._prefix = prefix
        self._in_thread = in_thread
        self._codec: ValueCodec[T] = codec if codec is not None else CACHED_COMPLETION_CODEC  # type: ignore[assignment]

    @property
    def name(self) -> str:
        return "disk"

    @property
    def cache(self) -> diskcache.Cache:
        return self._cache

    def entry_key(self, key: str) -> str:
        """The diskcache key holding ``key``'s entry."""
        return self._prefix + key

    def _lock_key(self, key: str) -> str:
        return f"{self._prefix}lock:{key}"

    async def _call(self, operation: str, function: Callable[..., R], *args: Any) -> R:
        try:
            if self._in_thread:
                return await asyncio.to_thread(function, *args)
            return function(*args)
        except _DISK_ERRORS as e:
            raise CacheBackendError(
                f"diskcache {operation} failed: {e!r}", store=self.name, operation=operation
            ) from e

    async def get(self, key: str) -> T | None:
        data = await self._call("get", self._cache.get, self.entry_key(key))
        if data is None:
            return None
        return self._codec.decode(bytes(data))

    async def set(self, key: str, value: T, ttl: float | None = None) -> None:
        data = self._codec.encode(value)
        await self._call("set", self._set, self.entry_key(key), data, ttl)

    def _set(self, disk_key: str, data: bytes, ttl: float | None) -> None:
        self._cache.set(disk_key, data, expire=ttl)

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        token = uuid.uuid4().hex
        added = await self._call("acquire_lock", self._add, self._lock_key(key), token, ttl)
        return token if added else None

    def _add(self, disk_key: str, token: str, ttl: float) -> bool:
        return bool(self._cache.add(disk_key, token, expire=ttl))

    async def refresh_lock(self, key: str, token: str, ttl: float) -> bool:
        return await self._call("refresh_lock", self._refresh, self._lock_key(key), token, ttl)

    def _refresh(self, disk_key: str, token: str, ttl: float) -> bool:
        with self._cache.transact():
            if self._cache.get(disk_key) != token:
                return False
            return bool(self._cache.touch(disk_key, expire=ttl))

    async def release_lock(self, key: str, token: str) -> None:
        await self._call("release_lock", self._release, self._lock_key(key), token)

    def _release(self, disk_key: str, token: str) -> None:
        with self._cache.transact():
            if self._cache.get(disk_key) == token:
                self._cache.delete(disk_key)
