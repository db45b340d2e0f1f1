"""``tokenmill tenants``: what an operator sets per tenant (quotas and shares of the workers)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import typer

import store
from cli.ledger import console, ledger_engine
from config import get_settings

__all__ = ["tenants_app"]

tenants_app = typer.Typer(
    help="Set and show tenants' quotas and shares of the workers.", no_args_is_help=True
)

_CLEAR = "none"


def _count(value: str, option: str) -> int | None:
    if value.strip().lower() == _CLEAR:
        return None
    try:
        count = int(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a whole number nor 'none'", param_hint=option) from None
    if count < 0:
        raise typer.BadParameter("must be >= 0 (or 'none' for no limit)", param_hint=option)
    return count


def _amount(value: str, option: str) -> Decimal | None:
    if value.strip().lower() == _CLEAR:
        return None
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise typer.BadParameter(f"{value!r} is not an amount nor 'none'", param_hint=option) from None
    if not amount.is_finite() or amount < 0:
        raise typer.BadParameter("must be a finite amount >= 0 (or 'none' for no limit)", param_hint=option)
    return amount


def _show(name: str) -> None:
    status = _status_of(name)
    quotas = status.quotas

    def limit(value: object) -> str:
        return "no limit" if value is None else str(value)

    typer.echo(f"tenant {name}")
    typer.echo(
        f"  queued requests: {status.queued_requests} of {limit(quotas.max_queued_requests)}"
        f" (left: {limit(status.remaining_requests)})"
    )
    typer.echo(
        f"  queued tokens:   {status.queued_tokens} of {limit(quotas.max_queued_tokens)}"
        f" (left: {limit(status.remaining_tokens)})"
    )
    typer.echo(
        f"  spent today:     {status.spent_today_usd} USD of {limit(quotas.daily_budget_usd)}"
        f" (left: {limit(status.remaining_budget_usd)}; the day starts at 00:00 UTC)"
    )
    source = "its own" if quotas.max_stored_bytes is not None else "the service default"
    typer.echo(
        f"  stored files:    {status.stored_bytes} bytes of {limit(status.max_stored_bytes)}"
        f" (left: {limit(status.remaining_stored_bytes)}; the limit is {source})"
    )
    weight = store.tenant_weight(ledger_engine(), name)
    typer.echo(f"  weight:          {weight:g} (its share of the workers)")


def _status_of(name: str) -> store.QuotaStatus:
    try:
        default = get_settings().default_max_stored_bytes
        return store.quota_status(ledger_engine(), name, default_max_stored_bytes=default)
    except store.NotFound as e:
        console.print(f"[red]no tenant {name!r} (`tokenmill keys create {name}` makes one)[/red]")
        raise typer.Exit(1) from e


@tenants_app.command("set")
def tenants_set(
    name: Annotated[str, typer.Argument(help="tenant name or id")],
    max_queued_requests: Annotated[
        str | None,
        typer.Option(help="requests queued or running at once; 'none' for no limit", metavar="N|none"),
    ] = None,
    max_queued_tokens: Annotated[
        str | None,
        typer.Option(help="their estimated prompt tokens; 'none' for no limit", metavar="N|none"),
    ] = None,
    daily_budget_usd: Annotated[
        str | None,
        typer.Option(help="US dollars billed per UTC day; 'none' for no limit", metavar="USD|none"),
    ] = None,
    max_stored_bytes: Annotated[
        str | None,
        typer.Option(
            help=(
                "bytes its uploaded files may hold (batch output files do not count); 'none' for the "
                "service default (TOKENMILL_DEFAULT_MAX_STORED_BYTES)"
            ),
            metavar="N|none",
        ),
    ] = None,
    weight: Annotated[
        float | None,
        typer.Option(
            "--weight",
            help=(
                "its share of the workers while several tenants' work waits: weight 2 is served twice "
                f"as fast as weight 1 (default 1; from {store.MIN_TENANT_WEIGHT:g} to "
                f"{store.MAX_TENANT_WEIGHT:g})"
            ),
        ),
    ] = None,
) -> None:
    """Set tenant NAME's quotas and weight; options not given keep their value. Over a quota,
    creating a batch, chat completion or agent run is refused (429, nothing queued); over
    --max-stored-bytes, an upload is (400 file_storage_quota_exceeded, nothing kept).

    Example: tokenmill tenants set acme --max-queued-requests 100000 --daily-budget-usd 50 --weight 2
    """
    changes: dict[str, Any] = {}
    if max_queued_requests is not None:
        changes["max_queued_requests"] = _count(max_queued_requests, "--max-queued-requests")
    if max_queued_tokens is not None:
        changes["max_queued_tokens"] = _count(max_queued_tokens, "--max-queued-tokens")
    if daily_budget_usd is not None:
        changes["daily_budget_usd"] = _amount(daily_budget_usd, "--daily-budget-usd")
    if max_stored_bytes is not None:
        changes["max_stored_bytes"] = _count(max_stored_bytes, "--max-stored-bytes")
    engine = ledger_engine()
    try:
        if weight is not None:
            store.set_tenant_weight(engine, name, weight)
        store.set_tenant_quotas(engine, name, **changes)
    except store.InvalidArgument as e:
        option = "--" + (e.param or "weight").replace("_", "-")
        raise typer.BadParameter(str(e), param_hint=option) from None
    except store.NotFound as e:
        console.print(f"[red]no tenant {name!r} (`tokenmill keys create {name}` makes one)[/red]")
        raise typer.Exit(1) from e
    _show(name)


@tenants_app.command("show")
def tenants_show(name: Annotated[str, typer.Argument(help="tenant name or id")]) -> None:
    """Tenant NAME's quotas, what they hold now and what is left.

    Example: tokenmill tenants show acme
    """
    _show(name)
