"""Per-process resources of a worker: the settings, one SQLAlchemy engine, one sync Redis client.

Created lazily on first use in the process that uses them; ``reset_after_fork`` (called from
Celery's ``worker_process_init``) drops whatever a parent handed down, without closing the
parent's sockets. Asyncio clients (Redis, the model clients) are not here: they belong to one
event loop and the chunk runner builds them per loop.
"""

from __future__ import annotations

import threading
from typing import Any

import redis
from sqlalchemy.engine import Engine

from store import make_engine
from workers.settings import Settings, get_settings

__all__ = ["close", "engine", "redis_client", "reset_after_fork", "settings"]

_lock = threading.Lock()
_engine: Engine | None = None
_redis: redis.Redis[Any] | None = None  # type: ignore[type-arg, unused-ignore]


def settings() -> Settings:
    return get_settings()


def engine() -> Engine:
    global _engine
    with _lock:
        if _engine is None:
            _engine = make_engine(settings().database_url)
        return _engine


def redis_client() -> redis.Redis[Any]:  # type: ignore[type-arg, unused-ignore]
    """The broker's Redis, for coordination keys (dispatch markers, the sweep lock)."""
    global _redis
    with _lock:
        if _redis is None:
            url = settings().broker_url
            if url is None:
                raise RuntimeError("no broker configured (TOKENMILL_BROKER_URL): embedded mode has no Redis")
            _redis = redis.Redis.from_url(url)
        return _redis


def reset_after_fork() -> None:
    global _engine, _redis
    with _lock:
        if _engine is not None:
            _engine.dispose(close=False)
        _engine = None
        _redis = None


def close() -> None:
    global _engine, _redis
    with _lock:
        if _engine is not None:
            _engine.dispose()
        if _redis is not None:
            _redis.close()
        _engine = None
        _redis = None
