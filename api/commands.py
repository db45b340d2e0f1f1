"""The producers' and operators' commands: ``api``, ``keys``, ``submit``, ``status``, ``results``,
``cancel``, ``usage``, ``prices``.

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
from workers.settings import get_settings

__all__ = ["api", "cancel", "keys_app", "prices_app", "results", "status", "submit", "usage"]

console = Console(stderr=True)
keys_app = typer.Typer(
    help="Create and revoke tenants' API keys; show or rotate their webhook secrets.", no_args_is_help=True
)
prices_app = typer.Typer(help="See and set the model prices usage is costed at.", no_args_is_help=True)
TenantOption = Annotated[str, typer.Option("--tenant", help="tenant the batch belongs to")]


def _engine() -> Engine:
    engine = store.make_engine(get_settings().database_url)
    try:
        store.require_schema_at_head(engine)
    except store.SchemaBehind as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from e
    return engine


def _batch(engine: Engine, batch_id: str) -> store.Batch:
    batch = store.get_batch(engine, batch_id)
    if batch is None:
        console.print(f"[red]no batch {batch_id}[/red]")
        raise typer.Exit(1)
    return batch


def _ensure_tenant(engine: Engine, name: str) -> store.Tenant:
    return store.get_tenant(engine, name) or store.create_tenant(engine, name, tenant_id=name)


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

    _engine().dispose()  # refuse to start on a schema that is behind, with the reason
    uvicorn.run("api.app:create_app", factory=True, host=host, port=port, workers=workers, log_level="info")


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Argument(help="tenant name (created if new)")]) -> None:
    """Create an API key for tenant NAME and print it, once, alone on stdout.

    Example: KEY=$(tokenmill keys create acme)
    """
    engine = _engine()
    tenant = _ensure_tenant(engine, name)
    typer.echo(store.create_api_key(engine, tenant.id, name=name))


@keys_app.command("webhook-secret")
def keys_webhook_secret(
    name: Annotated[str, typer.Argument(help="tenant name or id")],
    rotate: Annotated[
        bool, typer.Option("--rotate", help="replace it: deliveries from now on use the new one")
    ] = False,
) -> None:
    """Print the secret that signs tenant NAME's webhooks (``whsec_...``), alone on stdout.

    Example: tokenmill keys webhook-secret acme --rotate
    """
    try:
        typer.echo(store.webhook_secret(_engine(), name, rotate=rotate))
    except store.NotFound as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from e


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="the key, or its id")]) -> None:
    """Revoke a key: requests with it are refused from now on.

    Example: tokenmill keys revoke tm-...
    """
    if not store.revoke_api_key(_engine(), key):
        console.print("[red]no such key[/red]")
        raise typer.Exit(1)
    console.print("revoked")


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
    from api.app import dispatch_to_workers
    from api.routes.batches import check_agent_run_body

    settings = get_settings()
    if settings.broker_url is None:
        console.print(
            "[red]TOKENMILL_BROKER_URL is not set; for a batch on this machine use `tokenmill run`[/red]"
        )
        raise typer.Exit(2)
    engine = _engine()
    owner = _ensure_tenant(engine, tenant)
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
    for error in report.errors:
        console.print(f"line {error.line}: {error.code}: {error.message}")
    if report.status != store.BatchStatus.IN_PROGRESS:
        console.print(f"[red]batch {report.batch_id} rejected: {report.invalid_lines} bad lines[/red]")
        raise typer.Exit(1)
    dispatch_to_workers(engine, report.batch_id)
    typer.echo(report.batch_id)


def status(
    batch_id: Annotated[str, typer.Argument()],
    watch: Annotated[bool, typer.Option("--watch", help="live progress until the batch ends")] = False,
) -> None:
    """Show a batch's status and counts.

    Example: tokenmill status batch_abc --watch
    """
    engine = _engine()
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
    engine = _engine()
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
    engine = _engine()
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
    rows = store.usage_report(_engine(), tenant_id=tenant, group_by=groups, batch_id=batch_id)  # type: ignore[arg-type]
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


@prices_app.command("list")
def prices_list() -> None:
    """The prices ``usage`` and ``/v1/usage`` cost tokens at (US dollars per million tokens)."""
    table = Table("model", "input", "cached input", "output", "set at (UTC)")
    for name, price in sorted(store.get_prices(_engine()).items()):
        table.add_row(
            name,
            f"{price.input_per_million:g}",
            f"{price.cached_input_per_million:g}",
            f"{price.output_per_million:g}",
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(price.updated_at)),
        )
    Console().print(table)


@prices_app.command("set")
def prices_set(
    model: Annotated[str, typer.Argument(help="model name; also prices its dated versions")],
    input_price: Annotated[float, typer.Option("--input", min=0, help="$ per million prompt tokens")],
    output_price: Annotated[float, typer.Option("--output", min=0, help="$ per million completion tokens")],
    cached_input_price: Annotated[
        float | None,
        typer.Option("--cached-input", min=0, help="$ per million cached prompt tokens (default: --input)"),
    ] = None,
) -> None:
    """Set MODEL's price, e.g. from the provider's pricing page; the seeded ones may be dated.

    Example: tokenmill prices set gpt-4o-mini --input 0.15 --cached-input 0.075 --output 0.6
    """
    cached = input_price if cached_input_price is None else cached_input_price
    try:
        store.set_price(_engine(), model, input_price, cached, output_price)
    except ValueError as e:  # e.g. finer than a micro-dollar: prices are kept exact
        raise typer.BadParameter(str(e)) from None
    console.print(
        f"{model}: ${input_price:g} in, ${cached:g} cached in, ${output_price:g} out per million tokens"
    )
