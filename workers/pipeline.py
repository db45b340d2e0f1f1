"""The path of every model call a worker makes: cache -> rate limiter -> client with retries.

``ModelCallPipeline`` builds, per model, ``ChatCompletionCache(GovernedClient(client))``:

* the cache (with single-flight) answers repeats without an upstream call, and stores an answer
  before the caller records it ("bill follows the payer": a redo after a crash costs no second call);
* ``GovernedClient`` takes a global limiter slot before *every* upstream attempt (retries
  included, so the provider's view of our rate is what the limiter allows), gives it back with
  the outcome (a 429 shrinks the concurrency cap) and the real token usage, and retries
  retryable errors with ``RetryPolicy`` (backoff with jitter, honouring ``Retry-After``). A wait
  that would pass the policy's ``hand_back_after`` raises ``RetryLater`` (the runner puts the
  request back in line with that delay). A cancellation token stops the waits and the retries, not
  an attempt already sent: the provider bills that one whether or not we hang up, so its answer
  is kept.

The chunk runner calls ``call`` once per request; an agent calls ``create`` (or ``client_for``
to get a ``ChatCompletionClient`` it can hold), and so goes through the same path. A pipeline and
everything it holds belong to one event loop.

"Tenants apart" (docs/design.md): with ``cache_scope="tenant"`` (the default) each tenant's calls go
through a cache of their own namespace, so no tenant is served, or kept waiting by, another's
answer: otherwise the latency and the free bill of a hit would tell a tenant that someone sent that
prompt, and give it the answer. ``"global"`` shares answers across tenants (fewer upstream calls for
common prompts) for an operator who trusts every tenant with every other's prompts. Calls with no
tenant (the embedded ``tokenmill run``) share the namespace of no tenant.

"Bill follows the payer": ``call(payer=request id)`` makes the cache name the request
that paid for an answer, so a redo of that request after a crash bills the answer it finds in the
cache as its call, and any other request gets it as a free hit.

What one call cost (upstream attempts, time) is tallied in a ``CallStats`` kept in a context
variable, so that the layers between the caller and ``GovernedClient`` need not carry it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from models.base import ChatCompletionClient, DelegatingClient
from models.cache import (
    DEFAULT_LOCK_TTL,
    CachedCompletion,
    CacheStore,
    ChatCompletionCache,
    UncacheableRequestError,
    announcing_hits,
    paying_as,
)
from models.cancellation import CancellationToken
from models.errors import ModelClientError, QuotaExceeded, RateLimited
from models.events import Retry, emit
from models.retry import (
    RATE_LIMIT_DEADLINE,
    RetryLater,
    RetryPolicy,
    is_rate_limited,
    sleep_unless_cancelled,
)
from models.tokens import estimate_tokens
from models.types import CreateResult, LLMMessage, Tool, ToolChoice, ToolSchema
from store.clock import ledger_time
from telemetry.metrics import observe_limiter_wait
from workers.rate_limits import CallOutcome, LimiterUnavailable, RateLimiter, Slot

__all__ = [
    "CacheScope",
    "CallResult",
    "CallStats",
    "GovernedClient",
    "ModelCallPipeline",
    "cache_namespace",
    "limiter_endpoint",
]

_logger = logging.getLogger(__name__)

CacheScope = Literal["tenant", "global"]
"""Who shares cached answers and single-flight: each tenant alone, or every tenant."""


def cache_namespace(scope: CacheScope, tenant_id: str | None) -> str:
    """The cache namespace of a tenant's calls under ``scope`` ("" is shared)."""
    if scope == "global" or tenant_id is None:
        return ""
    return f"tenant:{tenant_id}"


@dataclass
class CallStats:
    """Upstream attempts made and the last error seen, for one logical call."""

    attempts: int = 0
    last_error: ModelClientError | None = None
    waited_for_limits_s: float = 0.0


_current_stats: ContextVar[CallStats | None] = ContextVar("tokenmill_call_stats", default=None)


@contextmanager
def _tally() -> Iterator[CallStats]:
    stats = CallStats()
    token = _current_stats.set(stats)
    try:
        yield stats
    finally:
        _current_stats.reset(token)


def limiter_endpoint(client: ChatCompletionClient) -> str:
    """What a client's limits are shared by: its provider and endpoint host, never a secret."""
    identity = client.cache_identity
    for name in ("endpoint", "base_url", "provider"):
        value = identity.get(name)
        if isinstance(value, str) and value:
            return value
    return "default"


def _positive_int(value: Any) -> int | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON's 1e12
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _completion_budget(extra_create_args: Mapping[str, Any]) -> int:
    # Providers count max_tokens against tokens-per-minute when the call is admitted.
    for name in ("max_completion_tokens", "max_tokens"):
        value = _positive_int(extra_create_args.get(name))
        if value is not None:
            return value
    return 0


def _choices(extra_create_args: Mapping[str, Any]) -> int:
    # Each of ``n`` choices may use the whole budget (providers count n * max_tokens too).
    return _positive_int(extra_create_args.get("n")) or 1


@dataclass
class _Tries:
    """One logical call's attempts: ``number`` the current one (1-based), ``counted`` the failures
    that count against ``max_attempts``, ``started`` when the call began (monotonic)."""

    number: int = 1
    counted: int = 0
    started: float = field(default_factory=time.monotonic)


class GovernedClient(DelegatingClient):
    """``client`` behind the global limiter, retried by ``retry``: one slot per attempt."""

    def __init__(
        self,
        client: ChatCompletionClient,
        limiter: RateLimiter,
        retry: RetryPolicy,
        *,
        model: str,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(client)
        self._limiter = limiter
        self._retry = retry
        self._model = model
        self._endpoint = endpoint or limiter_endpoint(client)
        self._calls_in_flight = 0
        self._retired = False

    async def retire(self) -> None:
        """Close the client once no call of it is in flight: the pipeline dropped it (calls already
        started finish on it; a holder that calls again reopens it, and it closes again after)."""
        self._retired = True
        if self._calls_in_flight == 0:
            await self.close()

    @contextlib.asynccontextmanager
    async def _in_flight(self) -> AsyncIterator[None]:
        self._calls_in_flight += 1
        try:
            yield
        finally:
            self._calls_in_flight -= 1
            if self._retired and self._calls_in_flight == 0:
                await asyncio.shield(self.close())

    def _estimate(
        self, messages: Sequence[LLMMessage], tools: Sequence[Tool | ToolSchema], extra: Mapping[str, Any]
    ) -> int:
        limits = self._limiter.limits_for(self._model)
        if limits is None or limits.tpm is None:
            return 0  # no token budget to reserve from: skip the tokenizer
        # Tools our schemas cannot say travel as written in ``extra`` (models.openai.requests);
        # an agent's ``extra_create_args`` are the tenant's JSON, unchecked: what is no object
        # is no tool to count (the provider judges it).
        as_written = extra.get("tools")
        counted: list[Tool | ToolSchema | Mapping[str, Any]] = list(tools)
        if isinstance(as_written, list):
            counted += [tool for tool in as_written if isinstance(tool, Mapping)]
        return self._limiter.reservation(
            self._model,
            prompt_tokens=estimate_tokens(messages, counted),
            completion_budget=_completion_budget(extra),
            choices=_choices(extra),
        )

    async def _acquire(self, estimate: int, cancellation_token: CancellationToken | None) -> Any:
        started = time.monotonic()
        slot = await self._limiter.acquire(
            self._endpoint,
            self._model,
            estimated_tokens=estimate,
            cancellation_token=cancellation_token,
            max_wait=self._retry.hand_back_after,
        )
        waited = time.monotonic() - started
        observe_limiter_wait(self._model, waited)
        stats = _current_stats.get()
        if stats is not None:
            stats.waited_for_limits_s += waited
        return slot

    async def _after_failure(
        self, tries: _Tries, error: ModelClientError, token: CancellationToken | None
    ) -> None:
        """Wait before the next attempt (and count it in ``tries``), or re-raise ``error`` if there
        is none. Raises ``RetryLater`` rather than wait past ``hand_back_after``, and
        ``CancelledError`` as soon as the token fires."""
        stats = _current_stats.get()
        if stats is not None:
            stats.last_error = error
        retry = self._retry
        attempt = tries.number
        if retry.hand_back_after is not None and not is_rate_limited(error):
            # Rate limits are bounded by time; only the other failures count against max_attempts.
            tries.counted += 1
        counted = tries.counted if retry.hand_back_after is not None else None
        delay = retry.next_delay(attempt, error, counted=counted)
        if delay is None:
            raise error
        deadline = RATE_LIMIT_DEADLINE.get()
        if deadline is not None and is_rate_limited(error) and ledger_time() + delay > deadline:
            raise error  # the request's retry budget for rate limits is spent
        hand_back_after = self._retry.hand_back_after
        if (
            hand_back_after is not None
            and is_rate_limited(error)
            and time.monotonic() - tries.started + delay > hand_back_after
        ):
            raise RetryLater(delay, f"{self._model} is rate limited: {error.message}", error)
        emit(
            Retry(
                model=self._model,
                attempt=attempt,
                delay_s=delay,
                error=f"{type(error).__name__}: {error.message}",
                retry_after=error.retry_after if isinstance(error, RateLimited) else None,
            )
        )
        await sleep_unless_cancelled(delay, token)
        tries.number += 1

    @staticmethod
    def _outcome_of(error: ModelClientError) -> CallOutcome:
        if isinstance(error, RateLimited) and not isinstance(error, QuotaExceeded):
            return CallOutcome.RATE_LIMITED
        return CallOutcome.FAILED

    @staticmethod
    def _count_attempt() -> None:
        stats = _current_stats.get()
        if stats is not None:
            stats.attempts += 1

    async def _release(self, slot: Slot, *, outcome: CallOutcome, actual_tokens: int | None = None) -> None:
        """Give the slot back. A limiter out of reach (its Redis frozen or restarting) is no
        failure of the call: an answer the provider sent, and billed, is kept rather than lost
        with an exception, and the slot's lease in the limiter lapses on its own."""
        try:
            await self._limiter.release(slot, outcome=outcome, actual_tokens=actual_tokens)
        except LimiterUnavailable as error:
            _logger.warning("a rate-limit slot could not be given back: %s", error)

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
        async with self._in_flight():
            return await self._create(
                messages,
                tools=tools,
                tool_choice=tool_choice,
                json_output=json_output,
                extra_create_args=extra_create_args,
                cancellation_token=cancellation_token,
            )

    async def _create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema],
        tool_choice: ToolChoice,
        json_output: bool | type[BaseModel] | None,
        extra_create_args: Mapping[str, Any],
        cancellation_token: CancellationToken | None,
    ) -> CreateResult:
        estimate = self._estimate(messages, tools, extra_create_args)
        tries = _Tries()
        while True:
            slot = await self._acquire(estimate, cancellation_token)
            self._count_attempt()
            try:
                # Not given the token: a cancel stops the waits and retries around this attempt,
                # not the attempt itself, which the provider bills whether or not we hang up.
                result = await self._client.create(
                    messages,
                    tools=tools,
                    tool_choice=tool_choice,
                    json_output=json_output,
                    extra_create_args=extra_create_args,
                )
            except ModelClientError as error:
                # A refused or failed call spent no tokens we can know of: refund the estimate.
                await self._release(slot, outcome=self._outcome_of(error), actual_tokens=0)
                await self._after_failure(tries, error, cancellation_token)
                continue
            except BaseException:
                await asyncio.shield(self._release(slot, outcome=CallOutcome.FAILED))
                raise
            await self._release(slot, outcome=CallOutcome.SUCCEEDED, actual_tokens=result.usage.total_tokens)
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
        """Retried only while nothing was yielded: a caller cannot take back chunks it has seen."""
        async with self._in_flight():
            async for item in self._create_stream(
                messages,
                tools=tools,
                tool_choice=tool_choice,
                json_output=json_output,
                extra_create_args=extra_create_args,
                cancellation_token=cancellation_token,
            ):
                yield item

    async def _create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema],
        tool_choice: ToolChoice,
        json_output: bool | type[BaseModel] | None,
        extra_create_args: Mapping[str, Any],
        cancellation_token: CancellationToken | None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        estimate = self._estimate(messages, tools, extra_create_args)
        tries = _Tries()
        while True:
            slot = await self._acquire(estimate, cancellation_token)
            self._count_attempt()
            yielded = False
            outcome, actual = CallOutcome.FAILED, None
            # Not given the token, as ``_create``'s attempt: a cancel stops the waits and retries
            # around it, not the stream itself, which the provider bills whether or not we hang up.
            stream = self._client.create_stream(
                messages,
                tools=tools,
                tool_choice=tool_choice,
                json_output=json_output,
                extra_create_args=extra_create_args,
            )
            try:
                async for item in stream:
                    if isinstance(item, CreateResult):
                        outcome, actual = CallOutcome.SUCCEEDED, item.usage.total_tokens
                    yielded = True
                    yield item
                return
            except ModelClientError as error:
                outcome, actual = self._outcome_of(error), 0
                if yielded:
                    raise
                await self._release(slot, outcome=outcome, actual_tokens=actual)
                slot = None
                await self._after_failure(tries, error, cancellation_token)
            finally:
                await stream.aclose()
                if slot is not None:
                    await asyncio.shield(self._release(slot, outcome=outcome, actual_tokens=actual))


@dataclass
class CallResult:
    """The outcome of one logical call: a result or the error that ended it, plus its cost."""

    result: CreateResult | None
    error: ModelClientError | None
    attempts: int
    latency_ms: float
    cache_key: str | None
    waited_for_limits_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cached(self) -> bool:
        return self.result is not None and self.result.cached


DEFAULT_MAX_MODELS = 64
# Cache wrappers kept per model, on average: one per tenant calling it lately.
_NAMESPACES_PER_MODEL = 16

ClientFactory = Callable[[str], ChatCompletionClient]
"""Builds the upstream client for a model name (called once per model per pipeline)."""


class ModelCallPipeline:
    """cache -> limiter -> client+retry for any model, on one event loop.

    ``client_factory(model)`` makes the raw client (e.g. an OpenAI client with the SDK's own
    retries off); ``cache_store`` None means no cache; ``cache_scope`` says whether tenants share
    cached answers (see the module's notes).
    """

    def __init__(
        self,
        client_factory: ClientFactory,
        limiter: RateLimiter,
        retry: RetryPolicy,
        *,
        cache_store: CacheStore[CachedCompletion] | None = None,
        cache_ttl: float | None = None,
        cache_scope: CacheScope = "tenant",
        cache_lock_ttl: float = DEFAULT_LOCK_TTL,
        max_models: int = DEFAULT_MAX_MODELS,
    ) -> None:
        self._client_factory = client_factory
        self.limiter = limiter
        self.retry = retry
        self._cache_store = cache_store
        self._cache_ttl = cache_ttl
        self._cache_scope: CacheScope = cache_scope
        self._cache_lock_ttl = cache_lock_ttl
        # Least recently used first. Model names are any string a tenant sends: without a bound, one
        # tenant could make every worker build (and keep) clients without end.
        self._max_models = max_models
        self._governed: OrderedDict[str, GovernedClient] = OrderedDict()
        # One cache per (model, namespace) over the model's one governed client.
        self._clients: OrderedDict[tuple[str, str], ChatCompletionClient] = OrderedDict()
        self._retiring: set[asyncio.Task[None]] = set()

    def client_for(self, model: str, *, tenant_id: str | None = None) -> ChatCompletionClient:
        """The governed (and cached) client of ``model`` for ``tenant_id``'s calls, built on first
        use; the tenant decides the cache namespace."""
        namespace = cache_namespace(self._cache_scope, tenant_id)
        client = self._clients.get((model, namespace))
        if client is not None:
            self._clients.move_to_end((model, namespace))
            self._governed.move_to_end(model)
        else:
            governed = self._governed.get(model)
            if governed is None:
                governed = self._governed[model] = GovernedClient(
                    self._client_factory(model), self.limiter, self.retry, model=model
                )
                self._drop_least_used_models()
            else:
                self._governed.move_to_end(model)
            client = (
                governed
                if self._cache_store is None
                else ChatCompletionCache(
                    governed,
                    self._cache_store,
                    self._cache_ttl,
                    lock_ttl=self._cache_lock_ttl,
                    namespace=namespace,
                )
            )
            self._clients[(model, namespace)] = client
            while len(self._clients) > self._max_models * _NAMESPACES_PER_MODEL:
                self._clients.popitem(last=False)  # a cache wrapper: nothing of its own to close
        return client

    def _drop_least_used_models(self) -> None:
        """Past ``max_models``, forget the least recently used model's clients; its governed client
        closes once its calls in flight are done."""
        while len(self._governed) > self._max_models:
            model, governed = self._governed.popitem(last=False)
            for key in [key for key in self._clients if key[0] == model]:
                del self._clients[key]
            task = asyncio.get_running_loop().create_task(governed.retire())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def cache_key(
        self,
        model: str,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        tenant_id: str | None = None,
    ) -> str | None:
        client = self.client_for(model, tenant_id=tenant_id)
        if not isinstance(client, ChatCompletionCache):
            return None
        try:
            return client.cache_key(
                messages,
                tools=tools,
                tool_choice=tool_choice,
                json_output=json_output,
                extra_create_args=extra_create_args,
            )
        except UncacheableRequestError:
            return None

    async def call(
        self,
        model: str,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
        tenant_id: str | None = None,
        payer: str | None = None,
        lookup_first: bool = True,
    ) -> CallResult:
        """One call for ``tenant_id``, paid for by ``payer`` (the request's id: see the module's
        notes); a ``ModelClientError`` that ended it is returned, not raised. ``lookup_first``
        False: the cache is read and locked in one trip (``ChatCompletionCache.create_under``)."""
        client = self.client_for(model, tenant_id=tenant_id)
        key = self.cache_key(
            model,
            messages,
            tools=tools,
            tool_choice=tool_choice,
            json_output=json_output,
            extra_create_args=extra_create_args,
            tenant_id=tenant_id,
        )
        started = time.perf_counter()
        # The key is hashed once: the cache is handed the one just computed. An uncacheable
        # request goes through ``create``, which reports it.
        create = (
            functools.partial(client.create_under, key, lookup_first=lookup_first)
            if key is not None and isinstance(client, ChatCompletionCache)
            else client.create
        )
        with _tally() as stats, paying_as(payer):
            try:
                result = await create(
                    messages,
                    tools=tools,
                    tool_choice=tool_choice,
                    json_output=json_output,
                    extra_create_args=extra_create_args,
                    cancellation_token=cancellation_token,
                )
                error = None
            except ModelClientError as e:
                result, error = None, e
            except RetryLater as later:
                later.attempts = stats.attempts  # counted in the result once the request ends
                raise
        return CallResult(
            result=result,
            error=error,
            attempts=stats.attempts,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            cache_key=key,
            waited_for_limits_s=stats.waited_for_limits_s,
        )

    async def call_stream(
        self,
        model: str,
        messages: Sequence[LLMMessage],
        on_chunk: Callable[[str, bool], Awaitable[None]],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
        tenant_id: str | None = None,
        payer: str | None = None,
    ) -> CallResult:
        """``call`` as a stream: ``on_chunk(text, cached)`` is awaited for each chunk of text as the
        provider sends it (``cached``: served from the cache, known before the first chunk). The
        upstream is asked for its usage whatever the caller wants, so the call is billed as any.
        Retried only until a chunk was handed on (``GovernedClient.create_stream``)."""
        client = self.client_for(model, tenant_id=tenant_id)
        extra = {**extra_create_args, "stream_options": {"include_usage": True}}
        key = self.cache_key(
            model,
            messages,
            tools=tools,
            tool_choice=tool_choice,
            json_output=json_output,
            extra_create_args=extra,
            tenant_id=tenant_id,
        )
        hit = False

        def announced() -> None:
            nonlocal hit
            hit = True

        started = time.perf_counter()
        result: CreateResult | None = None
        error: ModelClientError | None = None
        with _tally() as stats, paying_as(payer), announcing_hits(announced):
            try:
                stream = client.create_stream(
                    messages,
                    tools=tools,
                    tool_choice=tool_choice,
                    json_output=json_output,
                    extra_create_args=extra,
                    cancellation_token=cancellation_token,
                )
                async with contextlib.aclosing(stream):
                    async for item in stream:
                        if isinstance(item, CreateResult):
                            result = item
                        else:
                            await on_chunk(item, hit)
            except ModelClientError as e:
                result, error = None, e
            except RetryLater as later:
                later.attempts = stats.attempts
                raise
        if result is None and error is None:
            error = ModelClientError("the stream ended without a result", model=model)
        return CallResult(
            result=result,
            error=error,
            attempts=stats.attempts,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            cache_key=key,
            waited_for_limits_s=stats.waited_for_limits_s,
        )

    async def create(
        self,
        model: str,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
        tenant_id: str | None = None,
        payer: str | None = None,
    ) -> CreateResult:
        """Like ``call`` but raises the ``ModelClientError`` (the shape agents expect)."""
        outcome = await self.call(
            model,
            messages,
            tools=tools,
            tool_choice=tool_choice,
            json_output=json_output,
            extra_create_args=extra_create_args,
            cancellation_token=cancellation_token,
            tenant_id=tenant_id,
            payer=payer,
        )
        if outcome.error is not None:
            raise outcome.error
        assert outcome.result is not None
        return outcome.result

    async def close(self) -> None:
        # Closing a cache closes the governed client it wraps: close each governed client once.
        governed = list(self._governed.values())
        self._governed, self._clients = OrderedDict(), OrderedDict()
        for client in governed:
            await client.close()
        await asyncio.gather(*self._retiring)
        await self.limiter.close()
        close_store = getattr(self._cache_store, "close", None)
        if close_store is not None:
            await close_store()
