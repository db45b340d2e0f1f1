"""Structured logs: one JSON object per line (plain readable text on a terminal), through structlog's
formatter on the standard ``logging`` records of every library (ours, Celery, uvicorn, SQLAlchemy).

Each line has ``timestamp`` (ISO 8601, UTC), ``level``, ``logger`` and ``event`` (the message), and,
where known, the ``batch_id``, ``request_id`` and ``tenant`` of the request it was logged for
(``telemetry.context``: set per request task by the chunk runner, so every line of that request's
work carries them). A model event (``models.events``) becomes its own fields (``event`` is its
type). Records pass ``store.log_redaction`` first, installed here too: no prompt text or key
reaches a line through a database or validation error.

``logging_config(level, log_format)`` is a ``logging.config.dictConfig`` dictionary, so that it can
be handed to uvicorn (``log_config``), which applies it in each of its worker processes too.
"""

from __future__ import annotations

import logging
import logging.config
import sys
from typing import Any, Literal

import structlog
from structlog.typing import EventDict, WrappedLogger

from models.events import ModelEvent
from store.log_redaction import install_log_redaction
from telemetry.context import current_scope

__all__ = ["LogFormat", "configure_logging", "formatter", "logging_config", "wants_json"]

LogFormat = Literal["auto", "json", "text"]


def add_request_scope(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """The batch, request and tenant of the request being worked on, when there is one."""
    scope = current_scope()
    if scope is not None:
        event_dict.setdefault("batch_id", scope.batch_id)
        event_dict.setdefault("request_id", scope.request_id)
        if scope.tenant_id is not None:
            event_dict.setdefault("tenant", scope.tenant_id)
    return event_dict


def spread_model_event(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """A model event's fields as the line's own (``event`` is the event's type)."""
    record = event_dict.get("_record")
    event = getattr(record, "msg", None)
    if isinstance(event, ModelEvent):
        fields = event.to_dict()
        kind = fields.pop("type")
        for name, value in fields.items():
            # The provider's id of its answer, apart from the id of our request.
            event_dict.setdefault("upstream_request_id" if name == "request_id" else name, value)
        event_dict["event"] = kind
    return event_dict


def _shared_processors() -> list[Any]:
    return [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_request_scope,
        spread_model_event,
    ]


def wants_json(log_format: LogFormat) -> bool:
    """JSON lines unless asked for text, or on a terminal (stderr) by default."""
    return log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())


def formatter(log_format: LogFormat = "auto") -> logging.Formatter:
    """The formatter of every handler: JSON lines, or text when ``auto`` and stderr is a terminal."""
    install_log_redaction()
    as_json = wants_json(log_format)
    renderer: Any
    if as_json:
        last: list[Any] = [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(default=str),
        ]
    else:
        last = [structlog.dev.ConsoleRenderer(colors=False)]
    renderer = [structlog.stdlib.ProcessorFormatter.remove_processors_meta, *last]
    return structlog.stdlib.ProcessorFormatter(foreign_pre_chain=_shared_processors(), processors=renderer)


def logging_config(level: str | int = "INFO", log_format: LogFormat = "auto") -> dict[str, Any]:
    """Everything to stderr through ``formatter``; uvicorn's loggers too (they keep no handlers of
    their own, so their lines are formatted like the rest)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"structured": {"()": formatter, "log_format": log_format}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "structured",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            name: {"handlers": [], "propagate": True, "level": level}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery")
        },
    }


def configure_logging(level: str | int = "INFO", log_format: LogFormat = "auto") -> None:
    """Configure this process's logging (``logging_config``) and structlog's own loggers alike."""
    logging.config.dictConfig(logging_config(level, log_format))
    logging.captureWarnings(True)  # a library's warning is a log line too, not loose text
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
