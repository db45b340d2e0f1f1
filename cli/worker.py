"""``tokenmill worker``: a Celery worker on the broker named by TOKENMILL_BROKER_URL."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from telemetry.logs import LogFormat

__all__ = ["CONCURRENCY_HELP", "worker"]

CONCURRENCY_HELP = (
    "Requests in flight at once (per process for `worker`). Not Celery's -c, which sets the pool "
    "size: that is --processes here."
)


def worker(
    processes: Annotated[
        int | None, typer.Option("--processes", "-p", min=1, help="Worker processes (default: CPU count).")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-n", min=1, help=CONCURRENCY_HELP + " Default 64.")
    ] = None,
    queues: Annotated[
        str, typer.Option("--queues", "-Q", help="Comma-separated queues to consume.")
    ] = "tokenmill",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Celery node name (default: tokenmill@host).")] = None,
) -> None:
    """Start a Celery worker: P processes, each running N requests at once on its own event loop."""
    if concurrency is not None:
        os.environ["TOKENMILL_IN_FLIGHT_PER_PROCESS"] = str(concurrency)
    # SIGTERM does a soft shutdown: running chunks get worker_soft_shutdown_timeout, then requeue.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    from config import get_settings

    get_settings.cache_clear()
    if get_settings().broker_url is None:
        typer.echo("No broker: set TOKENMILL_BROKER_URL=redis://... (or use `tokenmill run`).", err=True)
        raise typer.Exit(2)
    settings = get_settings()
    if settings.worker_metrics_port is not None:
        # Before anything imports prometheus_client: it picks multiprocess mode on import.
        from telemetry.multiprocess import prepare_multiprocess_dir

        _serve_metrics_when_ready(prepare_multiprocess_dir())
    _log_structured(settings.log_format)
    from telemetry.logs import wants_json
    from workers.app import app

    # Celery's banner is loose text: left out where the logs are JSON lines (its "ready" line stays).
    argv = [
        *(["--quiet"] if wants_json(settings.log_format) else []),
        "worker",
        f"--concurrency={processes or os.cpu_count() or 1}",
        "--pool=prefork",
        f"--queues={queues}",
        f"--loglevel={loglevel}",
        "--task-events",
        f"--hostname={hostname or 'tokenmill@%h'}",
    ]
    app.worker_main(argv)


def _serve_metrics_when_ready(path: Path) -> None:
    """Serve the pool's metrics from the main process once the pool runs (``telemetry.exporter``)."""
    from celery.signals import worker_ready

    from config import get_settings

    def serve(**_: Any) -> None:
        from telemetry.exporter import start_exporter

        settings = get_settings()
        assert settings.worker_metrics_port is not None
        token = settings.metrics_token.get_secret_value() if settings.metrics_token is not None else None
        start_exporter(settings.worker_metrics_host, settings.worker_metrics_port, token, path)

    worker_ready.connect(serve, weak=False)


def _log_structured(log_format: LogFormat) -> None:
    """Celery configures no logging of its own when ``setup_logging`` has a receiver: ours, at the
    worker's ``--loglevel`` (``telemetry.logs``); the pool processes inherit it."""
    from celery.signals import setup_logging

    def configure(loglevel: Any = "INFO", **_: Any) -> None:
        from telemetry.logs import configure_logging

        configure_logging(loglevel or "INFO", log_format)

    setup_logging.connect(configure, weak=False)
    from telemetry.logs import configure_logging

    configure_logging("WARNING", log_format)  # until Celery's signal: its start-up warnings too
