"""Per-process resources of a worker: the settings, one SQLAlchemy engine, one sync Redis client,
one event loop and the model-call pipeline that lives on it.

Created lazily on first use in the process that uses them; ``reset_after_fork`` (called from
Celery's ``worker_process_init``) drops whatever a parent handed down, without closing the
parent's sockets. The event loop outlives each task (``run_in_loop``), so the pipeline's HTTP
connections, Redis pools and limiter state are reused by every chunk the process runs instead of
being rebuilt and reconnected per chunk; ``close`` (``worker_process_shutdown``) closes them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis
from sqlalchemy.engine import Engine

from config import Settings, get_settings
from store import make_engine
from telemetry import tracing
from telemetry.known_models import KnownModels, keep_fresh
from telemetry.model_events import install_model_event_metrics
from workers.clients import build_pipeline
from workers.pipeline import ModelCallPipeline

__all__ = ["close", "engine", "pipeline", "redis_client", "reset_after_fork", "run_in_loop", "settings"]

T = TypeVar("T")

_lock = threading.Lock()
_engine: Engine | None = None
_redis: redis.Redis[Any] | None = None  # type: ignore[type-arg, unused-ignore]
_loop: asyncio.Runner | None = None
_pipeline: ModelCallPipeline | None = None
_close_when_idle = False


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


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (it comes with ``uvicorn[standard]``), else asyncio's.
    Measured on bench/throughput.py, asyncio's own socket transports and scheduling cost a worker
    more CPU per request than anything of ours on the path of a request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_in_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end on this process's event loop (made on first use)."""
    global _loop
    if _loop is None:
        _loop = asyncio.Runner(loop_factory=new_event_loop)
    try:
        return _loop.run(coroutine)
    finally:
        if _close_when_idle:
            close()


def pipeline() -> ModelCallPipeline:
    """This process's model-call pipeline; call it from inside ``run_in_loop``, whose loop its
    async clients belong to."""
    global _pipeline
    if _pipeline is None:
        _pipeline = build_pipeline(settings())
        _start_metrics()
    return _pipeline


_metrics_started = False


def _start_metrics() -> None:
    """Once per process: count the model layer's events, and keep the metrics' model labels in
    step with the price table."""
    global _metrics_started
    if _metrics_started:
        return
    _metrics_started = True
    install_model_event_metrics()
    tracing.configure(settings(), "tokenmill-worker")  # here: after the prefork pool's fork
    keep_fresh(KnownModels(settings(), engine()))


def _inside_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def reset_after_fork() -> None:
    global _engine, _redis, _loop, _pipeline, _close_when_idle, _metrics_started
    with _lock:
        _close_when_idle = False
        if _engine is not None:
            _engine.dispose(close=False)
        _engine = None
        _redis = None
        # A parent's loop and clients hold the parent's sockets: left to it, never closed here.
        _loop = None
        _pipeline = None
        _metrics_started = False  # the parent's label thread did not survive the fork


def close() -> None:
    """Close the pipeline, the loop, the engine and the Redis client. Called from inside the loop
    (a shutdown signal mid-chunk), it waits for the running coroutine to end first."""
    global _engine, _redis, _loop, _pipeline, _close_when_idle
    if _inside_a_loop():
        _close_when_idle = True
        return
    with _lock:
        _close_when_idle = False
        loop, _loop = _loop, None
        used, _pipeline = _pipeline, None
        if loop is not None:
            try:
                if used is not None:
                    loop.run(used.close())
            finally:
                loop.close()
        if _engine is not None:
            _engine.dispose()
        if _redis is not None:
            _redis.close()
        _engine = None
        _redis = None
