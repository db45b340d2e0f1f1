"""OpenTelemetry spans, off unless ``TOKENMILL_TRACING`` (the ``tracing`` extra installed). Off, each
function here returns at its first line and ``opentelemetry`` is never imported
(tests/test_import_weight.py).

One trace per request ("a request's life", docs/design.md):

* a chat completion: the API's span is the root; the lane message carries its W3C ``traceparent``
  (``workers.lane_transport``), under which the worker's request span, the model call and the
  ledger write follow;
* a batch: the API's dispatch span is the batch's root (the create call or its background
  ingest); each Celery chunk message carries its ``traceparent`` in the message headers, the
  worker's chunk span continues it, and each line's request span (with its model calls) is a
  child of the chunk's: a batch line's spans are under its batch's trace. A chunk the sweeper
  sends again has no parent: its spans start a trace of their own.
* the ledger write: a chunk writes many requests in one flush, so a flush is one span, a child of
  the chunk's, with a link to the span of each request it carries; a single call's write is a
  child of its request span.

Span attributes never carry prompt or completion text, keys or headers ("secrets stay secret"):
ids, models, token counts, statuses. The model call span follows the GenAI semantic conventions,
built from the model layer's ``LLMCall`` / ``LLMStreamEnd`` event (``models`` knows nothing of
tracing), timed back from the event's latency.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext, Tracer

    from config import Settings
    from models.events import LLMCall, LLMStreamEnd

__all__ = [
    "TRACEPARENT",
    "Attributes",
    "configure",
    "current_span_context",
    "current_traceparent",
    "enabled",
    "install",
    "model_call",
    "span",
    "uninstall",
]

TRACEPARENT = "traceparent"  # the W3C Trace Context header
_INSTRUMENTATION = "tokenmill"
_NOTHING: AbstractContextManager[None] = contextlib.nullcontext()

_tracer: Tracer | None = None

Attributes = Mapping[str, str | int | float | bool | Sequence[str]]


def enabled() -> bool:
    return _tracer is not None


def configure(settings: Settings, service_name: str) -> None:
    """Once per process (after a fork): spans exported over OTLP/HTTP as the standard
    ``OTEL_EXPORTER_OTLP_*`` variables say (``OTEL_SERVICE_NAME`` overrides ``service_name``).
    Nothing when tracing is off, or when a provider is installed already."""
    if not settings.tracing or _tracer is not None:
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    install(provider)


def install(provider: TracerProvider) -> None:
    """Trace to ``provider`` from now on (tests give one with an in-memory exporter)."""
    global _tracer
    _tracer = provider.get_tracer(_INSTRUMENTATION)


def uninstall() -> None:
    global _tracer
    _tracer = None


def span(
    name: str,
    attributes: Attributes | None = None,
    *,
    traceparent: str | None = None,
    links: Sequence[SpanContext] = (),
) -> AbstractContextManager[Span | None]:
    """A span, current inside the ``with``: a child of ``traceparent``'s when given, else of the
    current span. Off: a shared null context."""
    tracer = _tracer
    if tracer is None:
        return _NOTHING
    from opentelemetry.trace import Link

    return tracer.start_as_current_span(
        name,
        context=None if traceparent is None else _extract(traceparent),
        attributes=attributes,
        links=[Link(context) for context in links],
    )


def current_traceparent() -> str | None:
    """The current span as a W3C ``traceparent`` value, for a message to carry; None when off or
    outside any span."""
    if _tracer is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get(TRACEPARENT)


def current_span_context() -> SpanContext | None:
    """The current span's context, to link to later (a ledger flush to its requests)."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def model_call(event: LLMCall | LLMStreamEnd, requested_model: str | None) -> None:
    """A span for one model call that just ended (GenAI semantic conventions: operation, models,
    provider, token usage; never the prompt or the answer)."""
    tracer = _tracer
    if tracer is None:
        return
    end = time.time_ns()
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": event.provider,
        "gen_ai.system": event.provider,  # the attribute's earlier name, still read by many backends
        "gen_ai.request.model": requested_model or event.model,
        "gen_ai.response.model": event.model,
        "gen_ai.usage.input_tokens": event.prompt_tokens,
        "gen_ai.usage.output_tokens": event.completion_tokens,
        "tokenmill.cached": event.cached,
        "tokenmill.attempt": event.attempt,
    }
    if event.endpoint:
        attributes["server.address"] = event.endpoint
    if event.finish_reason:
        attributes["gen_ai.response.finish_reasons"] = [event.finish_reason]
    if event.error is not None:
        # The class or the HTTP status only: a provider's message may quote the request.
        status = event.status_code
        attributes["error.type"] = str(status) if status is not None else event.error.split(":", 1)[0][:40]
    model_span = tracer.start_span(
        f"chat {requested_model or event.model}",
        attributes=attributes,
        start_time=end - int(event.latency_ms * 1_000_000),
    )
    if event.error is not None:
        from opentelemetry.trace import Status, StatusCode

        model_span.set_status(Status(StatusCode.ERROR))
    model_span.end(end_time=end)


def _extract(traceparent: str) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({TRACEPARENT: traceparent})
