"""Where the limiter's state lives: Redis (shared by every worker) or this process."""

from workers.rate_limits.backends.local import LocalRateLimiter
from workers.rate_limits.backends.redis import RedisRateLimiter

__all__ = ["LocalRateLimiter", "RedisRateLimiter"]
