"""``RedisStore``: the cache shared by every worker on every machine, over ``redis.asyncio``.

Entries are ``prefix + key`` strings (``SET ... PX ttl``); the lock of a key is
``prefix + "lock:" + key`` taken with ``SET NX PX`` and an owner token, refreshed and released by
small Lua scripts that compare the token first. A failed call raises ``CacheBackendError``.
``get_or_lock`` and ``set_and_release_lock`` (``models.cache.base.LockingStore``) do a miss's
get + lock and set + unlock in one script each (one round trip instead of two; the entry and its
lock are two keys, so on a Redis Cluster the prefix would need a hash tag).

Reads are batched: the ``get``s made in one turn of the event loop (a worker's concurrent lookups)
go out as one ``MGET`` (at most ``MAX_KEYS_PER_READ`` keys; a lone one as a plain ``GET``), since
redis-py's CPU per command, not Redis, is what limits cache hits per second in one process
(``bench/cache_hits.py``). Each caller still decodes its own value (an unreadable entry fails only
its own ``get``), and a failed ``MGET`` fails each of its ``get``s with a ``CacheBackendError`` of
its own. ``batch_reads=False`` sends a ``GET`` per call. (An ``MGET``, like the scripts, reads
keys of one hash slot only: on a Redis Cluster the prefix would need a hash tag for it too.)

Down and slow are told apart, because they call for opposite answers. A Redis that refuses or drops
the connection is down: the store answers ``CacheBackendError`` at once for ``outage_backoff``
seconds instead of trying again, so an outage costs each request almost nothing, and requests go
upstream without the cache. A Redis that does not answer within the timeout is taken for slow (a
loaded machine), not down: the error says ``timed_out``, no backoff starts, and single-flight keeps
waiting on it, since going around it would pay for the same answer many times. Build it with
``RedisStore.from_url`` to get its timeouts and no client-side retries; a ``Redis`` instance passed
in is used as configured.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar, overload

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from models.cache.entry import CACHED_COMPLETION_CODEC, CachedCompletion, ValueCodec
from models.cache.errors import CacheBackendError, CacheEntryError

__all__ = ["RedisStore"]

T = TypeVar("T")

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS: entry, lock. ARGV: owner token, lock ttl (ms). {1, entry} | {2}: locked for us | {0}: held.
_GET_OR_LOCK = """
local entry = redis.call('GET', KEYS[1])
if entry then
    return {1, entry}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {2}
end
return {0}
"""
# KEYS: entry, lock. ARGV: value, owner token, entry ttl (ms, or "" for none).
_SET_AND_RELEASE = """
if ARGV[3] == '' then
    redis.call('SET', KEYS[1], ARGV[1])
else
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
end
if redis.call('GET', KEYS[2]) == ARGV[2] then
    redis.call('DEL', KEYS[2])
end
return 1
"""
# Timeouts first: the builtin TimeoutError is an OSError, and redis's is neither a ConnectionError
# nor an OSError.
_TIMEOUT_ERRORS = (redis.exceptions.TimeoutError, TimeoutError)
_OUTAGE_ERRORS = (redis.exceptions.ConnectionError, OSError)
DEFAULT_TIMEOUT_SECONDS = 5.0
"""Per connect and per reply. Generous: a reply this late is a loaded Redis, which is waited for."""
# Answers a batched get whose MGET failed to parse: read the key again by itself.
_READ_ALONE = object()
MAX_KEYS_PER_READ = 256
"""The most ``get``s one ``MGET`` answers (a reply of a few hundred entries of a few KB each)."""


# The project may type-check against redis's own annotations or the older types-redis stubs,
# where Redis is generic; one alias keeps the difference in one place.
if TYPE_CHECKING:
    AsyncRedis: TypeAlias = redis.asyncio.Redis[Any]  # type: ignore[type-arg, unused-ignore]


@dataclass(slots=True)
class _PendingReads:
    """The ``get``s made in one turn of the event loop, answered together by one ``MGET``."""

    loop: asyncio.AbstractEventLoop
    keys: list[str]
    waiters: list[asyncio.Future[Any]]


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisStore(Generic[T]):
    """Entries and locks in one Redis database under ``prefix``."""

    @overload
    def __init__(
        self: RedisStore[CachedCompletion],
        redis_client: AsyncRedis,
        prefix: str = "tokenmill:cache:",
        *,
        outage_backoff: float = 1.0,
        batch_reads: bool = True,
        codec: None = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        redis_client: AsyncRedis,
        prefix: str = "tokenmill:cache:",
        *,
        outage_backoff: float = 1.0,
        batch_reads: bool = True,
        codec: ValueCodec[T],
    ) -> None: ...

    def __init__(
        self,
        redis_client: AsyncRedis,
        prefix: str = "tokenmill:cache:",
        *,
        outage_backoff: float = 1.0,
        batch_reads: bool = True,
        codec: ValueCodec[T] | None = None,
    ) -> None:
        self._redis = redis_client
        self._prefix = prefix
        self._outage_backoff = outage_backoff
        self._codec: ValueCodec[T] = codec if codec is not None else CACHED_COMPLETION_CODEC  # type: ignore[assignment]
        self._unreachable_until = 0.0
        self._batch_reads = batch_reads
        self._pending: _PendingReads | None = None
        self._reads_in_flight: set[asyncio.Task[None]] = set()  # strong references to running MGETs
        self._release_script = redis_client.register_script(_RELEASE)
        self._refresh_script = redis_client.register_script(_REFRESH)
        self._get_or_lock_script = redis_client.register_script(_GET_OR_LOCK)
        self._set_and_release_script = redis_client.register_script(_SET_AND_RELEASE)

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str = "tokenmill:cache:",
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        outage_backoff: float = 1.0,
        batch_reads: bool = True,
    ) -> RedisStore[CachedCompletion]:
        """A store on its own connection pool: ``timeout`` seconds per connect and per reply, and
        no client-side retries (single-flight decides whether to wait or go around the store)."""
        client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        return RedisStore(client, prefix, outage_backoff=outage_backoff, batch_reads=batch_reads)

    @property
    def name(self) -> str:
        return "redis"

    @property
    def redis(self) -> AsyncRedis:
        return self._redis

    def entry_key(self, key: str) -> str:
        """The Redis key holding ``key``'s entry."""
        return self._prefix + key

    def _lock_key(self, key: str) -> str:
        return f"{self._prefix}lock:{key}"

    async def close(self) -> None:
        """Close the Redis client's connections (the one ``from_url`` made, or the one given)."""
        await self._redis.aclose()  # type: ignore[attr-defined, unused-ignore]

    def _check_reachable(self, operation: str) -> None:
        if time.monotonic() < self._unreachable_until:
            raise CacheBackendError(
                "redis was unreachable moments ago; not retrying yet", store=self.name, operation=operation
            )

    def _failed(self, operation: str, error: Exception) -> CacheBackendError:
        timed_out = isinstance(error, _TIMEOUT_ERRORS)
        if not timed_out and isinstance(error, _OUTAGE_ERRORS):
            self._unreachable_until = time.monotonic() + self._outage_backoff
        return self._error(operation, error)

    def _error(self, operation: str, error: Exception) -> CacheBackendError:
        return CacheBackendError(
            f"redis {operation} failed: {error!r}",
            store=self.name,
            operation=operation,
            timed_out=isinstance(error, _TIMEOUT_ERRORS),
        )

    async def _execute(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        self._check_reachable(operation)
        try:
            return await self._redis.execute_command(*args, **kwargs)  # type: ignore[no-untyped-call, unused-ignore]
        except (redis.exceptions.RedisError, OSError, TimeoutError) as e:
            raise self._failed(operation, e) from e

    async def _script(self, operation: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        self._check_reachable(operation)
        try:
            return await script(keys=keys, args=args)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as e:
            raise self._failed(operation, e) from e

    def _decoded(self, data: bytes | str) -> T:
        # A client built with decode_responses=True hands back str.
        return self._codec.decode(data.encode("utf-8") if isinstance(data, str) else bytes(data))

    async def get(self, key: str) -> T | None:
        try:
            if self._batch_reads:
                data = await self._read(self.entry_key(key))
            else:
                data = await self._execute("get", "GET", self.entry_key(key))
        except UnicodeDecodeError as e:
            # A client that decodes its replies (decode_responses=True) met an entry of no UTF-8:
            # the entry is unreadable, as one the codec cannot parse (a miss, not an outage).
            raise CacheEntryError(f"the entry of {key!r} is not UTF-8 text: {e}") from e
        return None if data is None else self._decoded(data)

    async def _read(self, redis_key: str) -> Any:
        """``GET redis_key``, sent with every other ``get`` made in this turn of the event loop
        as one ``MGET``: one round trip, one connection and one command for all of them.

        Why: redis-py spends far more CPU per command (a pooled connection, packing, parsing)
        than a cache hit spends on its own work, so per-call GETs cap hits well below what
        Redis answers; concurrent lookups (a worker's many requests in flight) share one.
        A lone ``get`` waits for nothing: its read (a plain ``GET``) leaves at the next turn.
        """
        self._check_reachable("get")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        pending = self._pending
        if pending is not None and pending.loop is loop:
            pending.keys.append(redis_key)
            pending.waiters.append(waiter)
            if len(pending.keys) >= MAX_KEYS_PER_READ:
                self._pending = None  # full: the next get starts the next MGET
        else:
            pending = self._pending = _PendingReads(loop, [redis_key], [waiter])
            # The key is in before the task exists: under an eager task factory the task runs
            # (and closes the batch) at once, reading one key per MGET, correctly if unbatched.
            reading = loop.create_task(self._read_pending(pending))
            self._reads_in_flight.add(reading)
            reading.add_done_callback(self._reads_in_flight.discard)
        try:
            value = await waiter
            if value is _READ_ALONE:
                return await self._execute("get", "GET", redis_key)
            return value
        except asyncio.CancelledError:
            # Cancelled just after the answer came: retrieve it so that asyncio does not report
            # an error nobody read.
            if waiter.done() and not waiter.cancelled():
                waiter.exception()
            raise

    async def _read_pending(self, pending: _PendingReads) -> None:
        # Runs one turn after the first get: every get of that turn has joined by now.
        if self._pending is pending:
            self._pending = None
        try:
            if len(pending.keys) == 1:
                values = [await self._redis.execute_command("GET", pending.keys[0])]  # type: ignore[no-untyped-call, unused-ignore]
            else:
                values = await self._redis.execute_command("MGET", *pending.keys)  # type: ignore[no-untyped-call, unused-ignore]
        except (redis.exceptions.RedisError, OSError, TimeoutError) as e:
            self._failed("get", e)  # once: it starts the outage backoff
            for waiter in pending.waiters:
                if not waiter.done():
                    error = self._error("get", e)
                    error.__cause__ = e
                    waiter.set_exception(error)
            return
        except Exception as e:
            # Not the backend: its reply would not parse (a client that decodes replies, and an
            # entry of no UTF-8). Whose entry is to blame is unknown, so each get reads its key
            # again alone and the bad one fails only its own, not every lookup of its turn.
            for waiter in pending.waiters:
                if not waiter.done():
                    if len(pending.waiters) == 1:
                        waiter.set_exception(e)
                    else:
                        waiter.set_result(_READ_ALONE)
            return
        except BaseException:
            for waiter in pending.waiters:
                waiter.cancel()
            raise
        for waiter, value in zip(pending.waiters, values, strict=True):
            if not waiter.done():
                waiter.set_result(value)

    async def get_or_lock(self, key: str, ttl: float) -> tuple[T | None, str | None]:
        token = uuid.uuid4().hex
        reply = await self._script(
            "get_or_lock",
            self._get_or_lock_script,
            [self.entry_key(key), self._lock_key(key)],
            [token, _milliseconds(ttl)],
        )
        if reply[0] == 1:
            return self._decoded(reply[1]), None
        return None, token if reply[0] == 2 else None

    async def set_and_release_lock(self, key: str, value: T, ttl: float | None, token: str) -> None:
        await self._script(
            "set_and_release_lock",
            self._set_and_release_script,
            [self.entry_key(key), self._lock_key(key)],
            [self._codec.encode(value), token, "" if ttl is None else _milliseconds(ttl)],
        )

    async def set(self, key: str, value: T, ttl: float | None = None) -> None:
        data = self._codec.encode(value)
        if ttl is None:
            await self._execute("set", "SET", self.entry_key(key), data)
        else:
            await self._execute("set", "SET", self.entry_key(key), data, "PX", _milliseconds(ttl))

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        token = uuid.uuid4().hex
        taken = await self._execute(
            "acquire_lock", "SET", self._lock_key(key), token, "NX", "PX", _milliseconds(ttl)
        )
        return token if taken else None

    async def refresh_lock(self, key: str, token: str, ttl: float) -> bool:
        refreshed = await self._script(
            "refresh_lock", self._refresh_script, [self._lock_key(key)], [token, _milliseconds(ttl)]
        )
        return bool(refreshed)

    async def release_lock(self, key: str, token: str) -> None:
        await self._script("release_lock", self._release_script, [self._lock_key(key)], [token])
