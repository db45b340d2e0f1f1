"""The request a piece of work belongs to, in a context variable: set once per request task by the
chunk runner, read by the log processors (every line names its batch and request) and by the
metrics fed from model events (which carry no tenant)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["RequestScope", "current_scope", "enter_request"]


@dataclass(frozen=True, slots=True)
class RequestScope:
    batch_id: str
    request_id: str
    tenant_id: str | None
    model: str | None  # as the request named it (label it through telemetry.labels)


_scope: ContextVar[RequestScope | None] = ContextVar("tokenmill_request_scope", default=None)


def enter_request(scope: RequestScope) -> None:
    """Make ``scope`` current for the rest of this task (each request runs in a task of its own,
    whose context is a copy: nothing leaks to the chunk or to other requests)."""
    _scope.set(scope)


def current_scope() -> RequestScope | None:
    return _scope.get()
