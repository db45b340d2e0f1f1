"""``tokenmill api``: serve the HTTP API."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.ledger import ledger_engine

__all__ = ["APP_FACTORY", "api"]

APP_FACTORY = "api.app:create_served_app"  # uvicorn's factory, called in each of its processes


def api(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Serve the HTTP API (OpenAI-compatible files, batches and chat completions, plus usage).

    Example: tokenmill api --host 0.0.0.0 --port 8000, then
    OpenAI(base_url="http://HOST:8000/v1", api_key=KEY).batches.create(...)
    """
    import uvicorn

    from config import get_settings
    from telemetry.logs import logging_config

    ledger_engine().dispose()  # refuse to start on a schema that is behind, with the reason
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        # Applied in every uvicorn process: JSON lines (text on a terminal), request ids, redaction.
        log_config=logging_config("INFO", get_settings().log_format),
    )
