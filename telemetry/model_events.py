"""Metrics fed by the model layer's events (``models.events``): the models know nothing of
Prometheus; a handler on their event logger turns each event into observations, labelled with the
request the event happened in (``telemetry.context``).

The event logger must be enabled at INFO for events to be built at all; that is done here, and the
events are passed on to the loggers above only when those are enabled at INFO themselves, so that
counting them does not also print them at a quieter log level.
"""

from __future__ import annotations

import logging

from models.events import (
    EVENT_LOGGER_NAME,
    CacheHit,
    CacheMiss,
    EventSink,
    LLMCall,
    LLMStreamEnd,
    Retry,
)
from telemetry import metrics, tracing
from telemetry.context import current_scope
from telemetry.labels import model_labels, tenant_label

__all__ = ["ModelEventMetrics", "install_model_event_metrics"]

_RATE_LIMITED = 429


def _request_labels(event_model: str | None) -> tuple[str, str]:
    """(model, tenant) of the current request; the model the request named, else the event's."""
    scope = current_scope()
    if scope is None:
        return model_labels(event_model), tenant_label(None)
    return model_labels(scope.model or event_model), tenant_label(scope.tenant_id)


def _error_type(status_code: int | None, error: str | None) -> str:
    if error is None:
        return ""
    if status_code is not None:
        return str(status_code)
    # "ProviderTimeout: ..." -> the class, one of models.errors' few (bounded).
    kind = error.split(":", 1)[0]
    return kind if kind.isidentifier() and len(kind) <= 40 else "error"


class ModelEventMetrics(EventSink):
    """Observes each model event; then hands the record to the loggers above if they log INFO
    (if none does, ``models.events.emit`` hands it the events without a log record)."""

    def __init__(self, events: logging.Logger) -> None:
        super().__init__(logging.INFO)
        self._events = events

    def observe(self, event: object) -> None:
        observe_event(event)

    def passes_on(self) -> bool:
        return self._parent().isEnabledFor(logging.INFO)

    def _parent(self) -> logging.Logger:
        return self._events.parent or logging.getLogger()  # read now: loggers made later insert themselves

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        parent = self._parent()
        if parent.isEnabledFor(record.levelno):
            parent.handle(record)


def observe_event(event: object) -> None:
    if isinstance(event, LLMCall | LLMStreamEnd):
        model, tenant = _request_labels(event.model)
        error_type = _error_type(event.status_code, event.error)
        metrics.OPERATION_DURATION.labels(metrics.CHAT, model, tenant, error_type).observe(
            event.latency_ms / 1000.0
        )
        if event.status_code == _RATE_LIMITED:
            metrics.RATE_LIMITED.labels(model, tenant).inc()
        if isinstance(event, LLMStreamEnd) and event.first_chunk_ms is not None:
            metrics.TIME_TO_FIRST_CHUNK.labels(metrics.CHAT, model, tenant).observe(
                event.first_chunk_ms / 1000.0
            )
        if tracing.enabled():  # a child of the request's span: the event is emitted in its task
            scope = current_scope()
            tracing.model_call(event, scope.model if scope is not None else None)
    elif isinstance(event, CacheHit):
        model, tenant = _request_labels(event.model)
        metrics.CACHE_LOOKUPS.labels(model, tenant, "join" if event.joined else "hit").inc()
    elif isinstance(event, CacheMiss):
        model, tenant = _request_labels(event.model)
        metrics.CACHE_LOOKUPS.labels(model, tenant, "miss").inc()
    elif isinstance(event, Retry):
        model, tenant = _request_labels(event.model)
        metrics.RETRIES.labels(model, tenant).inc()


def install_model_event_metrics() -> None:
    """Count the model events of this process from now on (idempotent)."""
    logger = logging.getLogger(EVENT_LOGGER_NAME)
    if any(isinstance(handler, ModelEventMetrics) for handler in logger.handlers):
        return
    logger.addHandler(ModelEventMetrics(logger))
    logger.setLevel(logging.INFO)
    logger.propagate = False  # passed on by the handler, when the loggers above log INFO
