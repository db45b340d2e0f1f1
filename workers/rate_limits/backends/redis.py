"""The limiter shared by every worker on every machine: its state in Redis, each step one Lua
script run on the Redis server's clock.

The scripts are GCRA (``gcra.py``) and AIMD (``aimd.py``) in Lua, with one lease per call in a
sorted set scored by its expiry, so the slots of a killed worker come back after
``lease_seconds``. Keys: ``limit_key`` (a hash: the two theoretical arrival times and the AIMD cap)
and ``limit_leases_key`` (the leases), both expiring when idle.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from config import ModelLimits
from workers.constants import DEFAULT_KEY_PREFIX, limit_key, limit_leases_key
from workers.rate_limits.limiter import (
    CallOutcome,
    LimitDecision,
    LimiterState,
    LimiterTuning,
    LimiterUnavailable,
    RateLimiter,
    Slot,
)

__all__ = ["RedisRateLimiter"]


# KEYS[1] state hash, KEYS[2] leases sorted set.
# ARGV: rpm, tpm, max_in_flight, tokens, lease_id, lease_seconds, horizon, poll
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, tpm, max_in_flight = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, lease_id, lease_seconds = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local horizon, poll = tonumber(ARGV[7]), tonumber(ARGV[8])
-- No reservation books more than a minute of the limit (callers clamp too: see reservation).
if tpm > 0 and tokens > tpm then tokens = tpm end

redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local s = redis.call('HMGET', KEYS[1], 'tat_r', 'tat_t', 'cap', 'cap_until')
local cap = tonumber(s[3])
if cap and now >= (tonumber(s[4]) or 0) then
  cap = nil
  redis.call('HDEL', KEYS[1], 'cap', 'cap_until', 'decreased_at')
end
local limit = nil
if max_in_flight > 0 then limit = max_in_flight end
if cap and (not limit or cap < limit) then limit = cap end
if limit and redis.call('ZCARD', KEYS[2]) >= math.max(1, math.floor(limit)) then
  return {0, string.format('%.6f', poll)}
end

local start = now
if rpm > 0 then start = math.max(start, tonumber(s[1]) or 0) end
if tpm > 0 and tokens > 0 then start = math.max(start, tonumber(s[2]) or 0) end
if start - now > horizon then
  return {0, string.format('%.6f', start - now - horizon)}
end
if rpm > 0 then redis.call('HSET', KEYS[1], 'tat_r', string.format('%.6f', start + 60 / rpm)) end
if tpm > 0 and tokens > 0 then
  redis.call('HSET', KEYS[1], 'tat_t', string.format('%.6f', start + tokens * 60 / tpm))
end
redis.call('ZADD', KEYS[2], start + lease_seconds, lease_id)
local ttl = math.ceil((horizon + lease_seconds) * 1000) + 60000
redis.call('PEXPIRE', KEYS[2], ttl)
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ttl) end
return {1, string.format('%.6f', start - now)}
"""

# KEYS[1] state hash, KEYS[2] leases sorted set.
# ARGV: lease_id, tpm, max_in_flight, estimated, actual (-1 = unknown), outcome,
#       decrease_factor, decrease_cooldown, recovery
_RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease_id, tpm, max_in_flight = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local estimated, actual, outcome = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local factor, cooldown, recovery = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])

local in_flight = redis.call('ZCARD', KEYS[2])
redis.call('ZREM', KEYS[2], lease_id)
if tpm > 0 and actual >= 0 and actual ~= estimated then
  local tat = tonumber(redis.call('HGET', KEYS[1], 'tat_t')) or now
  if actual > estimated then
    tat = math.max(tat, now) + (actual - estimated) * 60 / tpm
  else
    tat = math.max(now, tat - (estimated - actual) * 60 / tpm)
  end
  redis.call('HSET', KEYS[1], 'tat_t', string.format('%.6f', tat))
end
local s = redis.call('HMGET', KEYS[1], 'cap', 'cap_until', 'decreased_at')
local cap = tonumber(s[1])
if cap and now >= (tonumber(s[2]) or 0) then cap = nil end
if outcome == 'rate_limited' then
  if now - (tonumber(s[3]) or 0) >= cooldown then
    if not cap then
      cap = math.max(1, in_flight)
      if max_in_flight > 0 and max_in_flight < cap then cap = max_in_flight end
    end
    cap = math.max(1, cap * factor)
    redis.call('HSET', KEYS[1], 'cap', string.format('%.6f', cap),
      'cap_until', string.format('%.6f', now + recovery), 'decreased_at', string.format('%.6f', now))
  end
elseif outcome == 'succeeded' and cap then
  cap = cap + 1 / cap
  if max_in_flight > 0 and cap >= max_in_flight then
    redis.call('HDEL', KEYS[1], 'cap', 'cap_until', 'decreased_at')
  else
    redis.call('HSET', KEYS[1], 'cap', string.format('%.6f', cap))
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(recovery * 1000) + 120000)
return 1
"""

# KEYS[1] state hash, KEYS[2] leases sorted set -> {in_flight, cap or ''}
_STATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
local s = redis.call('HMGET', KEYS[1], 'cap', 'cap_until')
if s[1] and now < (tonumber(s[2]) or 0) then return {n, s[1]} end
return {n, ''}
"""


class RedisRateLimiter(RateLimiter):
    """The limiter shared by every worker: state in Redis, each step one Lua script.

    Holds a ``redis.asyncio`` client, which belongs to the event loop it was first used on:
    build one per loop (the chunk runner does).
    """

    def __init__(
        self,
        client: aioredis.Redis[Any],  # type: ignore[type-arg, unused-ignore]
        limits: Mapping[str, ModelLimits],
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        tuning: LimiterTuning | None = None,
    ) -> None:
        super().__init__(limits, tuning)
        self.client = client
        self.key_prefix = key_prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._state = client.register_script(_STATE)

    @classmethod
    def from_url(
        cls,
        url: str,
        limits: Mapping[str, ModelLimits],
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        tuning: LimiterTuning | None = None,
    ) -> RedisRateLimiter:
        return cls(aioredis.Redis.from_url(url), limits, key_prefix=key_prefix, tuning=tuning)

    def _keys(self, endpoint: str, model: str) -> list[str]:
        return [
            limit_key(self.key_prefix, endpoint, model),
            limit_leases_key(self.key_prefix, endpoint, model),
        ]

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as e:
            raise LimiterUnavailable(f"rate limiter Redis failed: {e}") from e

    async def try_acquire(self, endpoint: str, model: str, *, estimated_tokens: int) -> LimitDecision:
        rpm, tpm, max_in_flight = self._paced_limits(model)
        lease_id = uuid.uuid4().hex
        tuning = self.tuning
        granted, wait = await self._run(
            self._acquire,
            self._keys(endpoint, model),
            [
                rpm,
                tpm,
                max_in_flight,
                max(0, estimated_tokens),
                lease_id,
                tuning.lease_seconds,
                tuning.horizon_seconds,
                tuning.poll_seconds,
            ],
        )
        if int(granted) == 1:
            return LimitDecision(True, float(wait), lease_id)
        return LimitDecision(False, float(wait))

    async def release(self, slot: Slot, *, outcome: CallOutcome, actual_tokens: int | None = None) -> None:
        _, tpm, max_in_flight = self._paced_limits(slot.model)
        tuning = self.tuning
        await self._run(
            self._release,
            self._keys(slot.endpoint, slot.model),
            [
                slot.lease_id,
                tpm,
                max_in_flight,
                slot.estimated_tokens,
                -1 if actual_tokens is None else actual_tokens,
                outcome.value,
                tuning.decrease_factor,
                tuning.decrease_cooldown_seconds,
                tuning.recovery_seconds,
            ],
        )
        self._wake(slot.endpoint, slot.model)

    async def state(self, endpoint: str, model: str) -> LimiterState:
        in_flight, cap = await self._run(self._state, self._keys(endpoint, model), [])
        cap_text = cap.decode() if isinstance(cap, bytes) else str(cap)
        return LimiterState(int(in_flight), float(cap_text) if cap_text else None)

    async def close(self) -> None:
        await self.client.aclose()  # type: ignore[attr-defined, unused-ignore]
