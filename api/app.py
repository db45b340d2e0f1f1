"""The producers' HTTP API: ``create_app()`` builds it; ``tokenmill api`` serves it."""

from __future__ import annotations

import gc
import os
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

import store
from agents.tools import load_tool_modules
from api.dashboard import router as dashboard_router
from api.errors import install_error_handlers
from api.idempotency import IdempotencyKeys
from api.limits import BodySizeLimit
from api.routes import agent_runs, batches, chat, files, health, metrics, model_catalog, usage, webhook_secret
from api.routes.batches import Dispatch
from api.uploads_in_flight import UploadsInFlight
from config import Settings, get_settings
from store.engine import normalize_url
from telemetry import tracing
from telemetry.known_models import KnownModels
from telemetry.ledger_metrics import LedgerCollector
from workers.webhooks import WebhookResolver

__all__ = [
    "ROUTERS",
    "create_app",
    "create_served_app",
    "dispatch_to_workers",
    "metrics_registry",
]


def dispatch_to_workers(engine: Engine, batch_id: str) -> None:
    """Send a batch's queued requests to the Celery workers, in chunks of ids."""
    from workers.enqueue import enqueue_batch, producer_dispatcher

    enqueue_batch(producer_dispatcher(engine), batch_id)


# The paths whose POST is an upload (its body up to max_upload_bytes, spooled to a temporary file).
UPLOAD_PATHS = ("/v1/files",)

# As many pooled connections as the threads that may use one at once (Starlette's
# run_in_threadpool and sync dependencies share AnyIO's default limiter of 40): with fewer (5, the
# default) every burst past them opened overflow connections and closed them again at check-in, a
# backend started and torn down per request at 16 concurrent single calls (py-spy: the API's
# threads spent 4% of their time connecting). Opened only as the peak needs them.
API_POOL_SIZE = 40


def metrics_registry(settings: Settings, engine: Engine) -> CollectorRegistry:
    """What the API's ``/metrics`` serves: the ledger's figures (``telemetry.ledger_metrics``)."""
    registry = CollectorRegistry()
    known = KnownModels(settings, engine)
    registry.register(LedgerCollector(engine, known.current, settings.metrics_ledger_cache_seconds))
    return registry


# Every route the API serves (a route reading its JSON body into a model: ``CheckedJSONRoute``).
ROUTERS = (
    health.router,
    files.router,
    batches.router,
    usage.router,
    chat.router,
    agent_runs.router,
    model_catalog.router,
    webhook_secret.router,
    dashboard_router,
    metrics.router,
)


def _lock_timeout(settings: Settings) -> dict[str, Any]:
    """The engine's arguments that bound each statement's wait for a lock, on PostgreSQL."""
    url = normalize_url(settings.database_url)
    if url.get_backend_name() != "postgresql" or settings.api_lock_timeout_seconds <= 0:
        return {}
    milliseconds = max(1, round(settings.api_lock_timeout_seconds * 1000))
    # After the URL's own options, which connect_args would otherwise replace, else PGOPTIONS'
    # (libpq reads it only for a connection given no options). (Behind PgBouncer: its
    # ignore_startup_parameters must list options, or set the timeout to 0.)
    given = url.query.get("options")
    given = given if isinstance(given, str) else " ".join(given or ())
    given = given or os.environ.get("PGOPTIONS", "")
    return {"connect_args": {"options": f"{given} -c lock_timeout={milliseconds}".strip()}}


def create_app(settings: Settings | None = None, *, dispatch: Dispatch | None = None) -> FastAPI:
    """Build the API. Refuses (``store.SchemaBehind``) a database whose schema is behind the code.

    ``dispatch`` sends a batch's queued requests to the workers; by default the Celery dispatch of
    ``workers``."""
    settings = settings or get_settings()
    tracing.configure(settings, "tokenmill-api")
    engine = store.make_engine(settings.database_url, pool_size=API_POOL_SIZE, **_lock_timeout(settings))
    store.require_schema_at_head(engine)
    # The same tools as the workers, so that an agent run naming an unknown one is refused at create.
    load_tool_modules(settings.tool_modules)
    if dispatch is None:
        dispatch = dispatch_to_workers

    app = FastAPI(
        title="tokenmill",
        version="0.1.0",
        description=(
            "OpenAI-compatible batch and chat completion API, run on Celery workers with a SQL ledger."
        ),
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.dispatch = dispatch
    app.state.metrics_registry = metrics_registry(settings, engine)
    # Webhook hosts are looked up on threads of their own, never the pool every route shares.
    app.state.webhook_resolver = WebhookResolver()
    install_error_handlers(app)
    # Innermost: what it serves passes the size limit and Idempotency-Key as any route does.
    app.add_middleware(chat.ChatCompletionsFastPath)
    # Added before the size limit, so that the limit wraps it: what it reads is bounded.
    app.add_middleware(IdempotencyKeys)
    # Outside the Idempotency-Key middleware, which spools the body: a tenant at its cap on
    # uploads in flight is refused before any of its body is read.
    app.add_middleware(
        UploadsInFlight, per_tenant=settings.max_uploads_in_flight_per_tenant, upload_paths=UPLOAD_PATHS
    )
    app.add_middleware(
        BodySizeLimit,
        body_limit=settings.max_request_body_bytes,
        upload_limit=settings.max_upload_bytes,
        upload_paths=UPLOAD_PATHS,
    )
    for router in ROUTERS:
        app.include_router(router)
    return app


def create_served_app() -> FastAPI:
    """``create_app()`` as ``tokenmill api`` serves it (uvicorn's factory, run in each of its
    processes), with the garbage collector set for serving.

    What startup made (modules, the app, its routes and schemas: some 200 000 objects, alive as
    long as the process) is frozen out of the collector's passes (``gc.freeze``). Measured at 16
    concurrent chat completions on 2 cores (bench/sync_latency.py): each full collection walked
    the startup objects for 400 ms, the whole API stopped (every call in flight took it on its
    latency), three in 40 s. Young collections keep Python's default threshold: a refused request
    leaves a cycle (its exception, traceback and frames) holding its body, and a threshold of
    20 000 let any client, keyless, pile up hundreds of MB of such bodies between collections."""
    app = create_app()
    gc.freeze()
    return app
