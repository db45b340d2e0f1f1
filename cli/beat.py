"""``tokenmill beat``: the sweeper, which re-queues what no message will run, and delivers webhooks."""

from __future__ import annotations

import signal
from typing import Annotated, Any

import typer

__all__ = ["beat"]


def beat(
    interval: Annotated[
        float | None, typer.Option(help="Seconds between sweeps (default: TOKENMILL_SWEEP_INTERVAL_SECONDS).")
    ] = None,
    once: Annotated[bool, typer.Option(help="Sweep once and exit.")] = False,
) -> None:
    """Re-queue requests no message will run: expired leases, lost or never-sent messages."""
    import logging

    from config import get_settings

    settings = get_settings()
    if settings.broker_url is None:
        typer.echo(
            "No broker: set TOKENMILL_BROKER_URL=redis://... (`tokenmill run` needs no sweeper).", err=True
        )
        raise typer.Exit(2)
    from telemetry.logs import configure_logging

    configure_logging(logging.INFO, settings.log_format)
    import threading

    from workers.sweeper import sweep, sweep_forever
    from workers.tasks import dispatcher
    from workers.webhooks import deliver_due_webhooks, deliver_webhooks_forever

    target = dispatcher()
    grace = int(settings.sweep_grace_seconds)
    allow_private, deadline_seconds = settings.webhook_allow_private, settings.webhook_timeout_seconds
    if once:
        report = sweep(target, grace_seconds=grace)
        delivered, failed = deliver_due_webhooks(
            target.engine, allow_private=allow_private, deadline_seconds=deadline_seconds
        )
        typer.echo(
            f"{report.dead_dispatches} lost dispatch(es), {report.redispatched} request(s) re-queued, "
            f"{delivered} webhook(s) delivered, {failed} failed"
        )
        return
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    interval_seconds = interval or settings.sweep_interval_seconds
    # Webhooks on a thread of their own: a slow receiver never holds up the re-dispatch of work.
    webhooks = threading.Thread(
        target=deliver_webhooks_forever,
        args=(target.engine, interval_seconds),
        kwargs={
            "allow_private": allow_private,
            "deadline_seconds": deadline_seconds,
            "should_stop": lambda: stopping,
        },
        name="webhooks",
        daemon=True,
    )
    webhooks.start()
    sweep_forever(target, interval_seconds, grace_seconds=grace, should_stop=lambda: stopping)
    webhooks.join(timeout=settings.webhook_timeout_seconds + 5)
