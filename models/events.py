"""Structured events of the model layer, logged on ``tokenmill.models.events``.

Attach a handler to ``logging.getLogger(EVENT_LOGGER_NAME)`` (as AutoGen users do with its event
logger) to receive them; ``record.msg`` is the event object and ``record.getMessage()`` is one JSON
line. ``emit`` checks ``isEnabledFor`` first, so with the logger off an event costs one level check
and the JSON is never built. Events never carry an API key, a header or a cache key's content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "EVENT_LOGGER_NAME",
    "CacheHit",
    "CacheMiss",
    "CacheStoreError",
    "EventSink",
    "LLMCall",
    "LLMStreamEnd",
    "LLMStreamStart",
    "ModelEvent",
    "Retry",
    "emit",
    "event_logger",
    "short_digest",
]

EVENT_LOGGER_NAME = "tokenmill.models.events"
event_logger = logging.getLogger(EVENT_LOGGER_NAME)
_INFO = logging.INFO


def short_digest(text: str | bytes) -> str:
    """A 16-hex-digit SHA-256 prefix: names a cache key in a log line without revealing it."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(slots=True)
class ModelEvent:
    """Base of the events; ``to_dict`` gives ``{"type": <class name>, **fields}``."""

    kind: ClassVar[str] = "ModelEvent"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind}
        for field in dataclasses.fields(self):
            out[field.name] = getattr(self, field.name)
        return out

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)


@dataclass(slots=True)
class LLMCall(ModelEvent):
    """One finished (or failed) non-streaming call, or a cache hit answered in its stead."""

    kind: ClassVar[str] = "LLMCall"

    model: str
    provider: str
    endpoint: str | None = None  # host of the base URL only, never a path or query with secrets
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    reasoning_tokens: int = 0
    cached: bool = False
    attempt: int = 1
    request_id: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    status_code: int | None = None  # the provider's HTTP status of a failed call (429: rate limited)


@dataclass(slots=True)
class LLMStreamStart(ModelEvent):
    kind: ClassVar[str] = "LLMStreamStart"

    model: str
    provider: str
    endpoint: str | None = None
    attempt: int = 1


@dataclass(slots=True)
class LLMStreamEnd(ModelEvent):
    """A stream that finished or broke; the tallies are what the stream reported."""

    kind: ClassVar[str] = "LLMStreamEnd"

    model: str
    provider: str
    endpoint: str | None = None
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    reasoning_tokens: int = 0
    cached: bool = False
    attempt: int = 1
    request_id: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    chunks: int = 0
    status_code: int | None = None
    first_chunk_ms: float | None = None  # time to the first text chunk, None if none came


@dataclass(slots=True)
class CacheHit(ModelEvent):
    kind: ClassVar[str] = "CacheHit"

    model: str | None
    key_digest: str  # short_digest(key), never the key itself
    store: str
    latency_ms: float = 0.0
    joined: bool = False  # served by another request's call this one waited for (single-flight)


@dataclass(slots=True)
class CacheMiss(ModelEvent):
    """A cacheable call found no entry and goes upstream itself (the single-flight leader)."""

    kind: ClassVar[str] = "CacheMiss"

    model: str | None
    key_digest: str
    store: str


@dataclass(slots=True)
class CacheStoreError(ModelEvent):
    """A cache store failed (Redis down, an unreadable entry); the call went on without it."""

    kind: ClassVar[str] = "CacheStoreError"

    store: str
    operation: str
    error: str
    key_digest: str | None = None


@dataclass(slots=True)
class Retry(ModelEvent):
    kind: ClassVar[str] = "Retry"

    model: str | None
    attempt: int  # the attempt that failed; the next one is attempt + 1
    delay_s: float
    error: str
    retry_after: float | None = None


class EventSink(logging.Handler):
    """A handler of the event logger that takes the events themselves (``observe``) and passes
    them on to the loggers above when ``passes_on()``. While it is the event logger's only
    handler, neither filtered nor passing on, ``models.events.emit`` hands it each event
    directly: no log record is built (a worker's every call emits two or three events, to count them)."""

    def observe(self, event: object) -> None:
        """Take one event (a ``ModelEvent``, or what else was logged on the event logger)."""
        raise NotImplementedError

    def passes_on(self) -> bool:
        raise NotImplementedError

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.observe(record.msg)
        except Exception:
            self.handleError(record)


def emit(event: ModelEvent) -> None:
    """Log ``event`` at INFO on the event logger; nothing is formatted if nobody listens."""
    if event_logger.isEnabledFor(_INFO):
        handlers = event_logger.handlers
        if len(handlers) == 1 and not event_logger.filters:
            sink = handlers[0]
            if (
                isinstance(sink, EventSink)
                and not sink.filters
                and sink.level <= _INFO
                and not sink.passes_on()
            ):
                try:
                    sink.observe(event)
                except Exception:  # as a handler's failure: reported, never the caller's
                    sink.handleError(
                        event_logger.makeRecord(EVENT_LOGGER_NAME, _INFO, "", 0, event, (), None)
                    )
                return
        event_logger.info(event)
