"""Global rate limits and concurrency caps per (endpoint, model).

Three limits guard each upstream call, all checked and taken in one atomic step:

* **requests per minute** and **tokens per minute**: GCRA (a token bucket kept as a "theoretical
  arrival time"). Each granted call is *scheduled*: the answer says how long to sleep before
  calling, so successive calls leave exactly ``60 / rpm`` seconds apart and nobody polls to find
  out when a slot frees. Schedules are handed out at most ``horizon`` seconds ahead; beyond that the
  answer is "ask again in N seconds". Tokens are reserved from an estimate when the call is granted
  and corrected with the real usage when it ends (``release``): an excess is charged at once, a
  refund never reaches into the past. A reservation is clamped (``reservation``): its completion
  part to the model's output limit, the whole to the tpm limit itself, so one request cannot book
  the schedule far ahead; a prompt alone larger than the limit can never go (``RequestTooLarge``).
* **in flight**: a lease per call in a sorted set scored by its expiry, so the slots of a killed
  worker come back after ``lease_seconds``. The cap is ``max_in_flight`` (none when the model has
  no entry) lowered by AIMD: a 429 multiplies it by ``decrease_factor`` (at most once per
  ``decrease_cooldown`` seconds, since one overload answers many calls at once), every success adds
  ``1 / cap`` (one slot per cap's worth of successes, as TCP does), and ``recovery_seconds`` after
  the last 429 the cap is dropped altogether. An unlimited model's first 429 starts the cap at the
  number of calls then in flight.

Waiting is bounded (``acquire``): a denied caller asks again after at most ``recheck_seconds``
(sooner when a call of this process gives tokens back), and after ``max_wait_seconds`` in all it
gets ``RetryLater`` with the wait still ahead, to hand its request back to the queue instead of
holding a worker slot. A cancelled token ends any of these waits at once.

Modules: ``gcra`` and ``aimd`` are the two algorithms as pure logic; ``limiter`` is the front the
model-call pipeline holds (``RateLimiter``: the bounded wait, the reservation, the errors);
``backends.redis`` (``RedisRateLimiter``) runs each step as a Lua script with the Redis server's
clock, so every worker on every machine shares one state; ``backends.local``
(``LocalRateLimiter``) is the same algorithm in process, for the embedded mode which has no Redis;
``split`` (``SplitRateLimiter``) sends configured models to the shared one, the others to the local
one.

Exceptions::

    LimiterError
     ├── LimiterUnavailable     the limiter's Redis did not answer
     └── RequestTooLarge        (also a ``BadRequest``) the prompt alone exceeds the tpm limit
"""

from workers.rate_limits.backends import LocalRateLimiter, RedisRateLimiter
from workers.rate_limits.limiter import (
    CallOutcome,
    LimitDecision,
    LimiterError,
    LimiterState,
    LimiterTuning,
    LimiterUnavailable,
    RateLimiter,
    RequestTooLarge,
    Slot,
)
from workers.rate_limits.split import SplitRateLimiter

__all__ = [
    "CallOutcome",
    "LimitDecision",
    "LimiterError",
    "LimiterState",
    "LimiterTuning",
    "LimiterUnavailable",
    "LocalRateLimiter",
    "RateLimiter",
    "RedisRateLimiter",
    "RequestTooLarge",
    "Slot",
    "SplitRateLimiter",
]
