"""``tokenmill flower``: Flower on the workers' broker, behind basic auth."""

from __future__ import annotations

import os
import sys

import typer

from config import get_settings

__all__ = ["flower"]


def flower(
    port: int = typer.Option(5555, help="port Flower listens on"),
    address: str = typer.Option("127.0.0.1", help="address Flower binds to (0.0.0.0 in a container)"),
    max_tasks: int = typer.Option(100_000, help="tasks Flower keeps in memory"),
) -> None:
    """Watch the workers in Flower (task events, queues, Prometheus /metrics).

    Needs TOKENMILL_BROKER_URL and TOKENMILL_FLOWER_BASIC_AUTH=user:password; there is no default
    password, so without it Flower does not start.

    Example: TOKENMILL_FLOWER_BASIC_AUTH=ops:s3cret tokenmill flower --port 5555
    """
    settings = get_settings()
    if settings.broker_url is None:
        raise typer.BadParameter("TOKENMILL_BROKER_URL is not set: Flower watches the workers of a broker")
    auth = settings.flower_basic_auth.get_secret_value() if settings.flower_basic_auth else ""
    user, _, password = auth.partition(":")
    if not user or not password:
        typer.echo(
            "refusing to start Flower without a password: set TOKENMILL_FLOWER_BASIC_AUTH=user:password",
            err=True,
        )
        raise typer.Exit(2)
    env = dict(os.environ)
    # Through the environment, not argv, so the password does not show in `ps`.
    env["FLOWER_BASIC_AUTH"] = auth
    argv = [
        sys.executable,
        "-m",
        "celery",
        "--app",
        "workers.app",
        "flower",
        f"--port={port}",
        f"--address={address}",
        f"--max_tasks={max_tasks}",
    ]
    os.execve(sys.executable, argv, env)
