"""The producers' and operators' batch commands: ``submit``, ``status``, ``results``, ``cancel``,
``usage``.

They work on the ledger named by TOKENMILL_DATABASE_URL (and send work through
TOKENMILL_BROKER_URL), as an operator on the same deployment; remote producers use the HTTP API
with any OpenAI client.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.engine import Engine

import store
from cli.ledger import console, ensure_tenant, ledger_engine
from config import get_settings

__all__ = ["cancel", "results", "status", "submit", "usage"]

TenantOption = Annotated[str, typer.Option("--tenant", help="tenant the batch belongs to")]


def _batch(engine: Engine, batch_id: str) -> store.Batch:
    batch = store.get_batch(engine, batch_id)
    if batch is None:
        console.print(f"[red]no batch {batch_id}[/red]")
        raise typer.Exit(1)
    return batch


def submit(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="JSONL: OpenAI batch lines or short form")
    ],
    model: Annotated[str | None, typer.Option(help="model for lines that name none")] = None,
    endpoint: Annotated[
        str, typer.Option(help="/v1/chat/completions or /v1/agent_runs")
    ] = "/v1/chat/completions",
    skip_invalid: Annotated[bool, typer.Option(help="queue the good lines, report the bad")] = False,
    tenant: TenantOption = "default",
) -> None:
    """Submit a batch; prints its id. Bad lines are listed with their line numbers.

    Example: BATCH=$(tokenmill submit prompts.jsonl --model gpt-4o-mini)
    """
    from workers.agent_tasks import check_agent_run_body
    from workers.enqueue import BROKER_UNREACHABLE, enqueue_batch, producer_dispatcher

    settings = get_settings()
    if settings.broker_url is None:
        console.print(
            "[red]TOKENMILL_BROKER_URL is not set; for a batch on this machine use `tokenmill run`[/red]"
        )
        raise typer.Exit(2)
    engine = ledger_engine()
    owner = ensure_tenant(engine, tenant)
    try:
        with file.open("rb") as source:
            report = store.ingest_batch(
                engine,
                source,
                tenant_id=owner.id,
                endpoint=endpoint,
                defaults={"model": model or settings.default_model},
                skip_invalid=skip_invalid,
                max_body_bytes=settings.max_request_body_bytes,
                max_lines=settings.max_requests_per_batch,
                # What the API checks in each line of an agent-run batch (tool names included).
                check_body=check_agent_run_body if endpoint == "/v1/agent_runs" else None,
            )
    except store.QuotaExceeded as e:
        console.print(f"[red]refused, nothing queued: {e.code}: {e}[/red]")
        raise typer.Exit(1) from e
    for error in report.errors:
        console.print(f"line {error.line}: {error.code}: {error.message}")
    if report.status != store.BatchStatus.IN_PROGRESS:
        console.print(f"[red]batch {report.batch_id} rejected: {report.invalid_lines} bad lines[/red]")
        raise typer.Exit(1)
    try:
        enqueue_batch(producer_dispatcher(engine), report.batch_id)
    except BROKER_UNREACHABLE as e:  # workers.enqueue: the batch waits in the ledger for the sweeper
        console.print(
            f"[yellow]the broker did not take the messages ({type(e).__name__}): {report.batch_id} is "
            "queued in the ledger, and `tokenmill beat` sends it once the broker is back[/yellow]"
        )
    typer.echo(report.batch_id)


def status(
    batch_id: Annotated[str, typer.Argument()],
    watch: Annotated[bool, typer.Option("--watch", help="live progress until the batch ends")] = False,
) -> None:
    """Show a batch's status and counts.

    Example: tokenmill status batch_abc --watch
    """
    engine = ledger_engine()
    batch = _batch(engine, batch_id)
    if watch:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(str(batch.status), total=batch.total_count)
            while batch.status not in store.ENDED_STATUSES:
                done = batch.completed_count + batch.failed_count + batch.cancelled_count
                progress.update(
                    task, completed=done, description=f"{batch.status} ({batch.failed_count} failed)"
                )
                time.sleep(1)
                batch = _batch(engine, batch_id)
            progress.update(task, completed=batch.total_count, description=str(batch.status))
    typer.echo(
        f"{batch.id} {batch.status} total={batch.total_count} completed={batch.completed_count} "
        f"failed={batch.failed_count} cancelled={batch.cancelled_count}"
    )


def results(
    batch_id: Annotated[str, typer.Argument()],
    output: Annotated[Path, typer.Option("-o", "--output", help="where to write the output JSONL")],
    errors: Annotated[Path | None, typer.Option("--errors", help="where to write the error JSONL")] = None,
) -> None:
    """Download a batch's results (OpenAI's output format); works while it runs.

    Example: tokenmill results batch_abc -o out.jsonl --errors errors.jsonl
    """
    engine = ledger_engine()
    _batch(engine, batch_id)
    with output.open("wb") as out:
        written = sum(out.write(line) > 0 for line in store.iter_output_lines(engine, batch_id))
    console.print(f"{written} results -> {output}")
    if errors is not None:
        with errors.open("wb") as out:
            failed = sum(out.write(line) > 0 for line in store.iter_error_lines(engine, batch_id))
        console.print(f"{failed} errors -> {errors}")


def cancel(batch_id: Annotated[str, typer.Argument()]) -> None:
    """Cancel a batch: queued requests are dropped, running ones finish or stop.

    Example: tokenmill cancel batch_abc
    """
    engine = ledger_engine()
    _batch(engine, batch_id)
    try:
        batch = store.cancel_batch(engine, batch_id)
    except store.InvalidState as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from e
    typer.echo(f"{batch.id} {batch.status}")


def usage(
    group_by: Annotated[str, typer.Option(help="comma-separated: model, day, batch")] = "model,day",
    tenant: Annotated[str | None, typer.Option("--tenant", help="one tenant (default: all)")] = None,
    batch_id: Annotated[str | None, typer.Option("--batch", help="one batch")] = None,
) -> None:
    """Tokens and cost, billed and cache hits apart.

    Example: tokenmill usage --group-by model,batch
    """
    groups = tuple(part.strip() for part in group_by.split(",") if part.strip())
    rows = store.usage_report(ledger_engine(), tenant_id=tenant, group_by=groups, batch_id=batch_id)  # type: ignore[arg-type]
    table = Table(
        "tenant", *groups, "requests", "billed in", "billed out", "cost $", "cache hits", "hit tokens"
    )
    for row in rows:
        keys = {"model": row.model, "day": str(row.day), "batch": row.batch_id}
        table.add_row(
            row.tenant_id,
            *[str(keys[group]) for group in groups],
            str(row.requests),
            str(row.billed_prompt_tokens),
            str(row.billed_completion_tokens),
            str(row.cost_usd),  # exact: a rounded figure would not add up
            str(row.cache_hits),
            str(row.cache_hit_prompt_tokens + row.cache_hit_completion_tokens),
        )
    Console().print(table)
