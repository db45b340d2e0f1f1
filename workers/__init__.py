"""tokenmill's workers: the Celery app and tasks, the global rate limiter, the chunk runner (shared
by Celery and the embedded ``tokenmill run``), dispatch and the recovery sweep.

Importing ``workers`` is cheap: the Celery app lives in ``workers.app`` and its tasks in
``workers.tasks``, loaded by the worker (``celery -A workers.app worker``, ``tokenmill worker``).

Exceptions (one tree per concern)::

    LimiterError                   workers.rate_limits
     └── LimiterUnavailable
    RequestCancelled               workers.runner: a handler stopped for its batch's cancellation
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.pipeline import CallResult, CallStats, GovernedClient, ModelCallPipeline
    from workers.rate_limits import (
        CallOutcome,
        LimitDecision,
        LimiterError,
        LimiterState,
        LimiterTuning,
        LimiterUnavailable,
        LocalRateLimiter,
        RateLimiter,
        RedisRateLimiter,
        Slot,
    )
    from workers.runner import (
        ChunkReport,
        ChunkRunner,
        RequestCancelled,
        RequestHandler,
        RunnerConfig,
        complete_chat,
        failed_record,
        record_of_call,
    )
else:
    import importlib

    # Each public name's submodule, imported on the name's first use (PEP 562): importing
    # ``workers`` or one of its submodules stays cheap.
    _SOURCES = {
        "CallOutcome": "workers.rate_limits",
        "LimitDecision": "workers.rate_limits",
        "LimiterError": "workers.rate_limits",
        "LimiterState": "workers.rate_limits",
        "LimiterTuning": "workers.rate_limits",
        "LimiterUnavailable": "workers.rate_limits",
        "LocalRateLimiter": "workers.rate_limits",
        "RateLimiter": "workers.rate_limits",
        "RedisRateLimiter": "workers.rate_limits",
        "Slot": "workers.rate_limits",
        "CallResult": "workers.pipeline",
        "CallStats": "workers.pipeline",
        "GovernedClient": "workers.pipeline",
        "ModelCallPipeline": "workers.pipeline",
        "ChunkReport": "workers.runner",
        "ChunkRunner": "workers.runner",
        "RequestCancelled": "workers.runner",
        "RequestHandler": "workers.runner",
        "RunnerConfig": "workers.runner",
        "complete_chat": "workers.runner",
        "failed_record": "workers.runner",
        "record_of_call": "workers.runner",
    }

    def __getattr__(name: str) -> object:
        if name not in _SOURCES:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return getattr(importlib.import_module(_SOURCES[name]), name)


__all__ = [
    "CallOutcome",
    "CallResult",
    "CallStats",
    "ChunkReport",
    "ChunkRunner",
    "GovernedClient",
    "LimitDecision",
    "LimiterError",
    "LimiterState",
    "LimiterTuning",
    "LimiterUnavailable",
    "LocalRateLimiter",
    "ModelCallPipeline",
    "RateLimiter",
    "RedisRateLimiter",
    "RequestCancelled",
    "RequestHandler",
    "RunnerConfig",
    "Slot",
    "complete_chat",
    "failed_record",
    "record_of_call",
]
