"""``ChatCompletionCache``: any ``ChatCompletionClient`` with a response cache in front.

Usage accounting ("a hit is free", docs/design.md): a hit returns a copy of the stored result with
``cached=True`` and the *original* ``usage`` numbers, because they describe the answer being
served (what it cost when it was made); whoever bills reads ``cached`` and charges 0 (the ledger
does). On this wrapper a hit moves ``total_usage()`` and never ``actual_usage()``, which counts
only calls that went upstream through it.

Who paid ("bill follows the payer"): calls made inside ``paying_as(payer)`` store
their answers naming ``payer`` (an opaque id; workers use the request's). A later call by the same
payer that finds that entry is a redo of a call it already paid for (say it crashed between the
cache write and its bill): it gets the answer as a call, ``cached=False``, counted in
``actual_usage``, so that its caller bills it once. Anyone else finding it gets a free hit.

Every store failure (Redis down, a timeout, an unreadable or other-version entry) is a miss plus a
``CacheStoreError`` event, never a failed request; errors from upstream are never cached. A stream
is stored only once it completed; one the consumer stops early, or that raises, stores nothing.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel

from models.base import ChatCompletionClient, DelegatingClient
from models.cache.base import CacheStore
from models.cache.entry import CachedCompletion
from models.cache.errors import CacheBackendError, CacheError, UncacheableRequestError
from models.cache.keys import identity_json, request_key_of_identity_json
from models.cache.memory import InMemoryStore
from models.cache.single_flight import DEFAULT_LOCK_TTL, Flight, SingleFlight
from models.cancellation import CancellationToken
from models.events import CacheHit, CacheMiss, CacheStoreError, emit, event_logger, short_digest
from models.types import CreateResult, LLMMessage, RequestUsage, Tool, ToolChoice, ToolSchema

__all__ = ["ChatCompletionCache", "announcing_hits", "paying_as"]

_SAVE_ATTEMPTS_ON_TIMEOUT = 3
_ABSENT = object()


_payer: ContextVar[str | None] = ContextVar("tokenmill_cache_payer", default=None)
_hit_listener: ContextVar[Callable[[], None] | None] = ContextVar(
    "tokenmill_cache_hit_listener", default=None
)


@contextlib.contextmanager
def announcing_hits(listener: Callable[[], None]) -> Iterator[None]:
    """Cache calls made in this block call ``listener()`` as soon as they serve a hit: for a
    stream, before its first replayed chunk (a caller relaying chunks can say "from the cache"
    before it relays any)."""
    token = _hit_listener.set(listener)
    try:
        yield
    finally:
        _hit_listener.reset(token)


@contextlib.contextmanager
def paying_as(payer: str | None) -> Iterator[None]:
    """Cache calls made in this block (and in tasks it starts) pay as ``payer``: the entries they
    store name it, and an entry it paid for is served back to it as its own call, not as a hit."""
    token = _payer.set(payer)
    try:
        yield
    finally:
        _payer.reset(token)


class ChatCompletionCache(DelegatingClient):
    """Serve repeated identical requests from ``store`` (default: an ``InMemoryStore``).

    ``ttl`` is the entries' lifetime in seconds (None: the store keeps them until evicted).
    Concurrent identical requests make one upstream call (see ``models.cache.single_flight``): the
    others wait for its entry as long as its lock is held, which is as long as the caller is alive
    (the lock lives ``lock_ttl`` seconds unless refreshed, which it is while the caller is alive),
    and go upstream themselves only when it lapses, when the store is down, or when a slow store
    has not said the lock is held for ``single_flight_timeout`` seconds.

    ``namespace`` partitions the store (see ``models.cache.keys``): caches with different
    namespaces never serve each other's answers nor wait on each other's calls, even on one store.
    """

    def __init__(
        self,
        client: ChatCompletionClient,
        store: CacheStore[CachedCompletion] | None = None,
        ttl: float | None = None,
        *,
        single_flight_timeout: float = 120.0,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        namespace: str = "",
    ) -> None:
        if ttl is not None and ttl <= 0:
            raise ValueError("ttl must be positive (or None for no expiry)")
        super().__init__(client)
        self._store: CacheStore[CachedCompletion] = store if store is not None else InMemoryStore()
        self._ttl = ttl
        self._namespace = namespace
        self._flights = SingleFlight(
            self._store, timeout=single_flight_timeout, lock_ttl=lock_ttl, on_store_error=self._store_failed
        )
        self._actual_usage = RequestUsage()
        self._total_usage = RequestUsage()
        # The inner client's identity as last rendered: a deep copy of it, and its JSON (see
        # _identity_json). None: not rendered yet.
        self._identity_snapshot: dict[str, Any] | None = None
        self._identity_rendered = ""

    @property
    def store(self) -> CacheStore[CachedCompletion]:
        return self._store

    @property
    def namespace(self) -> str:
        return self._namespace

    def cache_key(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
    ) -> str:
        """The key this request is cached under (without the store's prefix), for the ledger.

        Raises ``UncacheableRequestError`` if an argument has no canonical JSON form.
        """
        return request_key_of_identity_json(
            self._identity_json(),
            messages,
            tools=tools,
            tool_choice=tool_choice,
            json_output=json_output,
            extra_create_args=extra_create_args,
            namespace=self._namespace,
        )

    request_key = cache_key

    def _identity_json(self) -> str:
        # A client's identity does not change once it is built, and rendering it was most of a
        # key's cost: it is rendered again only when it differs (in a type-strict comparison,
        # since True and 1 render differently) from a deep copy of the one last rendered.
        identity = self._client.cache_identity
        if _strictly_equal_mappings(identity, self._identity_snapshot):
            return self._identity_rendered
        rendered = identity_json(identity)
        try:
            snapshot = copy.deepcopy(dict(identity))
        except Exception:  # an identity that cannot be copied is simply rendered every time
            return rendered
        self._identity_snapshot, self._identity_rendered = snapshot, rendered
        return rendered

    def _key_or_none(
        self,
        messages: Sequence[LLMMessage],
        tools: Sequence[Tool | ToolSchema],
        tool_choice: ToolChoice,
        json_output: bool | type[BaseModel] | None,
        extra_create_args: Mapping[str, Any],
    ) -> str | None:
        try:
            return self.cache_key(
                messages,
                tools=tools,
                tool_choice=tool_choice,
                json_output=json_output,
                extra_create_args=extra_create_args,
            )
        except UncacheableRequestError as e:
            emit(CacheStoreError(store=self._store.name, operation="key", error=str(e)))
            return None

    def _store_failed(self, error: CacheError, operation: str, key: str | None = None) -> None:
        if isinstance(error, CacheBackendError):
            operation = error.operation
        emit(
            CacheStoreError(
                store=self._store.name,
                operation=operation,
                error=str(error),
                key_digest=short_digest(key) if key is not None else None,
            )
        )

    async def _lookup(self, key: str) -> CachedCompletion | None:
        try:
            return await self._store.get(key)
        except CacheError as e:
            self._store_failed(e, "get", key)
            return None

    async def _save(self, key: str, entry: CachedCompletion, flight: Flight[CachedCompletion]) -> None:
        # A set that timed out is tried again while we still hold the key's lock: an answer that
        # never reaches a slow store sends every request waiting for it upstream again.
        locking = self._flights.locking_store
        for attempt in range(1, _SAVE_ATTEMPTS_ON_TIMEOUT + 1):
            try:
                if locking is not None and flight.lock_token is not None:
                    # The write and the unlock in one trip; the flight's end then drops nothing.
                    await locking.set_and_release_lock(key, entry, self._ttl, flight.lock_token)
                    flight.released = True
                else:
                    await self._store.set(key, entry, self._ttl)
                return
            except CacheError as e:
                self._store_failed(e, "set", key)
                slow = isinstance(e, CacheBackendError) and e.timed_out
                if not slow or attempt == _SAVE_ATTEMPTS_ON_TIMEOUT:
                    return

    def _served(
        self, entry: CachedCompletion, key: str, started: float, *, joined: bool = False
    ) -> CreateResult:
        # Every get decodes a fresh entry for this call alone, so flagging its result in place
        # shares nothing with the store or with any other caller.
        result = entry.result
        if entry.paid_by is not None and entry.paid_by == _payer.get():
            # The answer this payer's own earlier attempt paid for: its call, to be billed once.
            result.cached = False
            self._spent(result)
            return result
        result.cached = True
        listener = _hit_listener.get()
        if listener is not None:
            listener()
        self._total_usage = self._total_usage + result.usage
        if event_logger.isEnabledFor(logging.INFO):  # skip building the event when nobody listens
            emit(
                CacheHit(
                    model=result.model or _identity_model(self._client),
                    key_digest=short_digest(key),
                    store=self._store.name,
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                    joined=joined,
                )
            )
        return result

    def _missed(self, key: str) -> None:
        if event_logger.isEnabledFor(logging.INFO):
            emit(
                CacheMiss(
                    model=_identity_model(self._client), key_digest=short_digest(key), store=self._store.name
                )
            )

    def _spent(self, result: CreateResult) -> None:
        self._actual_usage = self._actual_usage + result.usage
        self._total_usage = self._total_usage + result.usage

    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> CreateResult:
        started = time.perf_counter()
        return await self.create_under(
            self._key_or_none(messages, tools, tool_choice, json_output, extra_create_args),
            messages,
            tools=tools,
            tool_choice=tool_choice,
            json_output=json_output,
            extra_create_args=extra_create_args,
            cancellation_token=cancellation_token,
            started=started,
        )

    async def create_under(
        self,
        key: str | None,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
        started: float | None = None,
        lookup_first: bool = True,
    ) -> CreateResult:
        """``create`` for a caller that has the request's ``cache_key`` already (the worker's
        pipeline records it in the ledger): the key is not computed twice. None: not cached.

        ``lookup_first`` False skips the plain read and goes straight to the flight's
        read-or-lock: a miss costs one round trip fewer, a hit one script instead of a GET (for
        callers whose requests rarely repeat, such as single calls)."""
        if started is None:
            started = time.perf_counter()
        if key is not None and lookup_first:
            # A plain read (a GET, or part of the MGET of concurrent lookups), not the
            # read-or-lock script: a hit is the path that must cost least (a script costs Redis
            # more than a GET; bench/cache_hits.py), and a miss's lock is taken with a second
            # read in one trip by the flight.
            entry = await self._lookup(key)
            if entry is not None:
                return self._served(entry, key, started)

        async def upstream() -> CreateResult:
            result = await self._client.create(
                messages,
                tools=tools,
                tool_choice=tool_choice,
                json_output=json_output,
                extra_create_args=extra_create_args,
                cancellation_token=cancellation_token,
            )
            self._spent(result)
            return result

        if key is None:
            return await upstream()
        async with self._flights.flight(key, cancellation_token) as flight:
            if flight.entry is not None:
                # Joined: found after a plain read missed, or after waiting on another's flight
                # (without the plain read, the flight's first read may simply hit).
                return self._served(flight.entry, key, started, joined=lookup_first or flight.waited)
            self._missed(key)
            result = await upstream()
            await self._save(key, CachedCompletion(result=result, paid_by=_payer.get()), flight)
            return result

    async def create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        """On a hit, replay the stored chunks and the result (``cached=True``); an entry stored
        by ``create`` replays its text content as one chunk. On a miss, stream from the inner
        client and store the chunks and result once the stream has finished."""
        started = time.perf_counter()
        key = self._key_or_none(messages, tools, tool_choice, json_output, extra_create_args)
        if key is not None:
            entry = await self._lookup(key)
            if entry is not None:
                served = self._served(entry, key, started)  # before the chunks: it announces a hit
                for chunk in _replayed_chunks(entry):
                    yield chunk
                yield served
                return

        def upstream() -> AsyncGenerator[str | CreateResult, None]:
            return self._client.create_stream(
                messages,
                tools=tools,
                tool_choice=tool_choice,
                json_output=json_output,
                extra_create_args=extra_create_args,
                cancellation_token=cancellation_token,
            )

        if key is None:
            async with contextlib.aclosing(upstream()) as stream:
                async for item in stream:
                    if isinstance(item, CreateResult):
                        self._spent(item)
                    yield item
            return

        async with self._flights.flight(key, cancellation_token) as flight:
            if flight.entry is not None:
                served = self._served(flight.entry, key, started, joined=True)
                for chunk in _replayed_chunks(flight.entry):
                    yield chunk
                yield served
                return
            self._missed(key)
            chunks: list[str] = []
            async with contextlib.aclosing(upstream()) as stream:
                async for item in stream:
                    if isinstance(item, CreateResult):
                        # The last item: the stream is complete, so it may be stored.
                        self._spent(item)
                        stored = CachedCompletion(result=item, chunks=chunks, paid_by=_payer.get())
                        await self._save(key, stored, flight)
                        yield item
                        return
                    chunks.append(item)
                    yield item

    def actual_usage(self) -> RequestUsage:
        return self._actual_usage

    def total_usage(self) -> RequestUsage:
        return self._total_usage


def _replayed_chunks(entry: CachedCompletion) -> list[str]:
    if entry.chunks is not None:
        return list(entry.chunks)
    content = entry.result.content
    return [content] if isinstance(content, str) and content else []


def _strictly_equal_mappings(mapping: Mapping[str, Any], snapshot: dict[str, Any] | None) -> bool:
    if snapshot is None or len(mapping) != len(snapshot):
        return False
    for name, value in mapping.items():
        other = snapshot.get(name, _ABSENT)
        if type(value) is str:  # the usual entry (provider, endpoint, model): compared inline
            if type(other) is not str or value != other:
                return False
        elif not _strictly_equal(value, other):
            return False
    return True


def _strictly_equal(value: object, other: object) -> bool:
    """Equal, and of the same types all the way down (``1 == 1.0 == True`` are not)."""
    if type(value) is not type(other):
        return False
    if isinstance(value, dict) and isinstance(other, dict):
        return _strictly_equal_mappings(value, other)
    if isinstance(value, list | tuple) and isinstance(other, list | tuple):
        return len(value) == len(other) and all(
            _strictly_equal(item, other_item) for item, other_item in zip(value, other, strict=True)
        )
    return value == other


def _identity_model(client: ChatCompletionClient) -> str | None:
    model = client.cache_identity.get("model")
    return model if isinstance(model, str) else None
