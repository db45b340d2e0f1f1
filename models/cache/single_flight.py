"""Single-flight: concurrent identical requests make one upstream call.

Two layers. In one process, requests for a key queue on an ``asyncio.Lock``, so only the first
touches the store's lock and the rest just read the entry it leaves. Across processes, the first
in each process competes for the store's lock (``CacheStore.acquire_lock``); the winner calls
upstream while a background task refreshes the lock every third of its TTL, and the losers poll
``get`` with a backoff growing from ``poll_initial`` to ``poll_max`` until the entry appears. A
loser retries the lock on every poll, so when the holder fails (it stores nothing, releases the
lock) or crashes (its lock expires after ``lock_ttl``), one loser becomes the next leader.

The lock's TTL is short (``DEFAULT_LOCK_TTL``, seconds) and the live holder's heartbeat keeps it:
a holder that was killed (a SIGKILLed ``tokenmill run``, a worker lost with its machine) stops
delaying everyone else within that TTL, instead of leaving requests it will never answer waited on.

A waiter waits as long as the key's lock is held, i.e. as long as its holder is alive (a live
holder's heartbeat keeps it; a dead one's lapses within ``lock_ttl``): a holder that is slow (behind
the rate limiter, or on a slow upstream) is waited for, however long, because going around it pays
for the same answer twice. Only the waiter's own cancellation token ends that wait (the request's
cancel or deadline). ``timeout`` bounds only the time a waiter goes without news of a live holder:
when the store is down (``CacheBackendError`` not ``timed_out``), the request goes upstream at once,
uncoordinated (``Flight.coordinated`` is False), as the cache is an optimisation and never the
reason a request fails; a store that only timed out is slow, not gone, and is waited for until
``timeout`` seconds have passed since it last said the lock was held, because going around a
loaded store turns load into duplicate upstream calls.

A store that can read-or-lock and write-and-unlock in one round trip each
(``models.cache.base.LockingStore``: ``RedisStore``) has them used: the lock is taken with the
entry's second read in one trip, a leader's ``Flight`` carries its lock token so that the answer is
stored and the lock dropped in one more (``ChatCompletionCache``), and each poll is one trip. With
the cache's first read (a plain GET, the hit path), a miss costs three round trips, not five; what
is read, locked and written, and when, is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from models.cache.base import CacheStore, LockingStore
from models.cache.errors import CacheBackendError, CacheEntryError, CacheError
from models.cancellation import CancellationToken

__all__ = ["DEFAULT_LOCK_TTL", "Flight", "SingleFlight"]

T = TypeVar("T")

DEFAULT_LOCK_TTL = 5.0
"""Seconds a holder's lock outlives its last heartbeat (every third of it): how long a killed
holder can keep others waiting."""

StoreErrorHandler = Callable[[CacheError, str, str], None]
"""Called with (error, operation, key) when the store fails; the flight goes on without it."""


@dataclass(slots=True)
class Flight(Generic[T]):
    """What joining a flight gave: an ``entry`` another request stored while we waited, or none,
    in which case this request calls upstream; ``coordinated`` says it holds the key's lock,
    ``lock_token`` is that lock's owner token; ``released`` is set by whoever dropped the lock
    with the entry's write (``LockingStore.set_and_release_lock``), so the flight's end does not
    drop it again; ``waited`` says the entry came after waiting on another request's flight (of
    this process or another), not from the first read."""

    entry: T | None
    coordinated: bool
    lock_token: str | None = None
    released: bool = False
    waited: bool = False


class _LocalGate:
    """An ``asyncio.Lock`` per key, dropped when nobody holds or waits on it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class SingleFlight(Generic[T]):
    def __init__(
        self,
        store: CacheStore[T],
        *,
        timeout: float,
        lock_ttl: float,
        on_store_error: StoreErrorHandler,
        poll_initial: float = 0.005,
        poll_max: float = 0.2,
    ) -> None:
        if timeout < 0 or lock_ttl <= 0:
            raise ValueError("timeout must be >= 0 and lock_ttl > 0")
        self._store = store
        self._timeout = timeout
        self._lock_ttl = lock_ttl
        self._on_store_error = on_store_error
        self._poll_initial = poll_initial
        self._poll_max = poll_max
        self._gates: dict[str, _LocalGate] = {}
        # Checked once: a runtime protocol check costs more than the call it would choose.
        self._locking: LockingStore[T] | None = store if isinstance(store, LockingStore) else None

    @property
    def locking_store(self) -> LockingStore[T] | None:
        """The store, if it reads-or-locks and writes-and-unlocks in one trip each."""
        return self._locking

    async def _get_or_lock(self, key: str) -> tuple[T | None, str | None, bool]:
        """(entry, lock token, whether the entry was read in the same trip). Raises the store's
        ``CacheError`` of the lock."""
        if self._locking is not None:
            try:
                entry, token = await self._locking.get_or_lock(key, self._lock_ttl)
                return entry, token, True
            except CacheEntryError as e:
                self._on_store_error(e, "get", key)  # unreadable: a miss; take the lock alone
        return None, await self._store.acquire_lock(key, self._lock_ttl), False

    async def _get(self, key: str) -> T | None:
        try:
            return await self._store.get(key)
        except CacheError as e:
            self._on_store_error(e, "get", key)
            return None

    @contextlib.asynccontextmanager
    async def flight(
        self, key: str, cancellation_token: CancellationToken | None = None
    ) -> AsyncIterator[Flight[T]]:
        """Wait for ``key``'s entry or for the right to fetch it; the lock is released on exit."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _LocalGate()
        gate.users += 1
        gate_held = False
        token: str | None = None
        try:
            entry, gate_held, token, waited = await self._join_cancellable(key, gate, cancellation_token)
            if entry is not None or token is None:
                yield Flight(entry=entry, coordinated=False, waited=waited)
                return
            # The heartbeat's task starts at its first beat: a call that ends sooner (most do: a
            # beat is every third of the lock's TTL, seconds) costs one timer, not a task.
            done = asyncio.Event()
            beats: list[asyncio.Future[None]] = []

            def first_beat() -> None:
                beats.append(asyncio.ensure_future(self._keep_lock(key, token, done, first=True)))

            timer = asyncio.get_running_loop().call_later(self._lock_ttl / 3, first_beat)
            flight: Flight[T] = Flight(entry=None, coordinated=True, lock_token=token)
            try:
                yield flight
            finally:
                done.set()
                timer.cancel()
                for heartbeat in beats:
                    heartbeat.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await heartbeat
                if not flight.released:
                    await self._release(key, token)
        finally:
            if gate_held:
                gate.lock.release()
            gate.users -= 1
            if gate.users == 0:
                del self._gates[key]

    async def _join_cancellable(
        self, key: str, gate: _LocalGate, cancellation_token: CancellationToken | None
    ) -> tuple[T | None, bool, str | None, bool]:
        if cancellation_token is None:
            return await self._join(key, gate)
        # A task the token can cancel; if we are cancelled just as it finished, give back what it took.
        waiting = asyncio.ensure_future(self._join(key, gate))
        cancellation_token.link_future(waiting)
        try:
            return await waiting
        except BaseException:
            if waiting.done() and not waiting.cancelled() and waiting.exception() is None:
                _, gate_held, token, _ = waiting.result()
                if gate_held:
                    gate.lock.release()
                if token is not None:
                    await self._release(key, token)
            raise

    async def _join(self, key: str, gate: _LocalGate) -> tuple[T | None, bool, str | None, bool]:
        """(entry found, local gate held, store lock token, whether it waited on another's
        flight). Leaves nothing held if cancelled."""
        waited_locally = gate.lock.locked()
        # No deadline: the gate's holder is a live request of this process, and it leaves the
        # gate once its own flight ends.
        await gate.lock.acquire()
        try:
            if waited_locally:
                # Another request of this process was fetching this key; its entry is likely there.
                entry = await self._get(key)
                if entry is not None:
                    return entry, True, None, True
            entry, token, waited = await self._lead_or_wait(key)
            return entry, True, token, waited or waited_locally
        except BaseException:
            gate.lock.release()
            raise

    async def _lead_or_wait(self, key: str) -> tuple[T | None, str | None, bool]:
        """(entry, lock token, whether it waited for another holder of the lock)."""
        delay = self._poll_initial
        waited = False
        # Moved on each time the store says the lock is held: a live holder is waited for.
        deadline = time.monotonic() + self._timeout
        while True:
            holder_alive = False
            read = False
            try:
                entry, token, read = await self._get_or_lock(key)
            except CacheError as e:
                self._on_store_error(e, "acquire_lock", key)
                if not _store_is_slow(e):
                    return None, None, waited
                token = None  # slow, not down: wait on, and try the lock again
            else:
                if entry is not None:
                    return entry, None, waited
                holder_alive = token is None
            if holder_alive:
                deadline = time.monotonic() + self._timeout
            if token is not None:
                if read:
                    return None, token, waited  # read in the same trip as the lock: nothing in between
                try:
                    # The previous holder may have stored the entry between our miss and our lock.
                    entry = await self._get(key)
                except BaseException:
                    await self._release(key, token)
                    raise
                if entry is not None:
                    await self._release(key, token)
                    return entry, None, waited
                return None, token, waited
            remaining = delay if holder_alive else deadline - time.monotonic()
            if remaining <= 0:
                return None, None, waited
            await asyncio.sleep(min(delay, remaining))
            waited = True
            delay = min(delay * 2, self._poll_max)
            if self._locking is not None:
                continue  # the next get_or_lock reads the entry too
            entry = await self._get(key)
            if entry is not None:
                return entry, None, waited

    async def _keep_lock(self, key: str, token: str, done: asyncio.Event, *, first: bool = False) -> None:
        # Ended by ``done``, not by cancellation alone: on 3.11 a cancel that lands as a store
        # call's own timeout fires comes out as that timeout (then a CacheError, survived below),
        # and a heartbeat that missed its cancel would hold the lock, and its flight, forever.
        # ``first``: started by its first beat's timer, it beats at once.
        while not done.is_set():
            if not first:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._lock_ttl / 3):
                        await done.wait()
            first = False
            if done.is_set():
                return
            try:
                if not await self._store.refresh_lock(key, token, self._lock_ttl):
                    return
            except CacheError as e:
                self._on_store_error(e, "refresh_lock", key)

    async def _release(self, key: str, token: str) -> None:
        try:
            await self._store.release_lock(key, token)
        except CacheError as e:
            self._on_store_error(e, "release_lock", key)


def _store_is_slow(error: CacheError) -> bool:
    return isinstance(error, CacheBackendError) and error.timed_out
