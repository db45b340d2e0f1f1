"""``tokenmill tenants``: what an operator sets per tenant."""

from __future__ import annotations

from typing import Annotated

import typer

import store
from cli.ledger import console, ledger_engine

__all__ = ["tenants_app"]

tenants_app = typer.Typer(help="Set tenants' shares of the workers.", no_args_is_help=True)


@tenants_app.command("set")
def tenants_set(
    name: Annotated[str, typer.Argument(help="tenant name or id")],
    weight: Annotated[
        float | None,
        typer.Option(
            "--weight",
            help=(
                "its share of the workers while several tenants' work waits: weight 2 is served twice "
                f"as fast as weight 1 (default 1; above 0, at most {store.MAX_TENANT_WEIGHT:g})"
            ),
        ),
    ] = None,
) -> None:
    """Set what the operator decides for tenant NAME; options not given stay as they are.

    Example: tokenmill tenants set acme --weight 2
    """
    engine = ledger_engine()
    try:
        if weight is not None:
            store.set_tenant_weight(engine, name, weight)
        current = store.tenant_weight(engine, name)
    except store.InvalidArgument as e:
        raise typer.BadParameter(str(e), param_hint="--weight") from None
    except store.NotFound as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from e
    console.print(f"{name}: weight {current:g}")
