"""``InMemoryStore``: one process's cache, the default of ``ChatCompletionCache``.

Values are kept encoded (the same bytes the shared stores hold), so a hit always decodes a fresh
object and nothing a caller does to a returned result reaches the store. Locks are in-process,
which is all single-flight needs when the store itself is in-process.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from typing import Generic, TypeVar, overload

from models.cache.entry import CACHED_COMPLETION_CODEC, CachedCompletion, ValueCodec

__all__ = ["InMemoryStore"]

T = TypeVar("T")


class InMemoryStore(Generic[T]):
    """A dict with TTLs, bounded to ``max_entries`` (least recently used evicted first) if given."""

    @overload
    def __init__(
        self: InMemoryStore[CachedCompletion], *, max_entries: int | None = None, codec: None = None
    ) -> None: ...

    @overload
    def __init__(self, *, max_entries: int | None = None, codec: ValueCodec[T]) -> None: ...

    def __init__(self, *, max_entries: int | None = None, codec: ValueCodec[T] | None = None) -> None:
        if max_entries is not None and max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._codec: ValueCodec[T] = codec if codec is not None else CACHED_COMPLETION_CODEC  # type: ignore[assignment]
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._locks: dict[str, tuple[str, float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> T | None:
        found = self._entries.get(key)
        if found is None:
            return None
        data, expires_at = found
        if expires_at is not None and expires_at <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return self._codec.decode(data)

    async def set(self, key: str, value: T, ttl: float | None = None) -> None:
        expires_at = None if ttl is None else time.monotonic() + ttl
        self._entries[key] = (self._codec.encode(value), expires_at)
        self._entries.move_to_end(key)
        if self._max_entries is not None:
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        now = time.monotonic()
        held = self._locks.get(key)
        if held is not None and held[1] > now:
            return None
        token = uuid.uuid4().hex
        self._locks[key] = (token, now + ttl)
        return token

    async def refresh_lock(self, key: str, token: str, ttl: float) -> bool:
        held = self._locks.get(key)
        if held is None or held[0] != token or held[1] <= time.monotonic():
            return False
        self._locks[key] = (token, time.monotonic() + ttl)
        return True

    async def release_lock(self, key: str, token: str) -> None:
        held = self._locks.get(key)
        if held is not None and held[0] == token:
            del self._locks[key]
