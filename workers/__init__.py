"""tokenmill's workers: the Celery app and tasks, the global rate limiter, the chunk runner (shared
by Celery and the embedded ``tokenmill run``), dispatch and the recovery sweep.

Importing ``workers`` is cheap: the Celery app lives in ``workers.app`` and its tasks in
``workers.tasks``, loaded by the worker (``celery -A workers.app worker``, ``tokenmill worker``).

Exceptions (one tree per concern)::

    LimiterError                   workers.rate_limits
     └── LimiterUnavailable
    RequestCancelled               workers.runner: a handler stopped for its batch's cancellation
"""

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
from workers.settings import ModelLimits, Settings, get_settings

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
    "ModelLimits",
    "RateLimiter",
    "RedisRateLimiter",
    "RequestCancelled",
    "RequestHandler",
    "RunnerConfig",
    "Settings",
    "Slot",
    "complete_chat",
    "failed_record",
    "get_settings",
    "record_of_call",
]
