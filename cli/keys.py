"""``tokenmill keys``: tenants' API keys and webhook secrets."""

from __future__ import annotations

from typing import Annotated

import typer

import store
from cli.ledger import console, ensure_tenant, ledger_engine

__all__ = ["keys_app"]

keys_app = typer.Typer(
    help="Create and revoke tenants' API keys; show or rotate their webhook secrets.", no_args_is_help=True
)


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Argument(help="tenant name (created if new)")]) -> None:
    """Create an API key for tenant NAME and print it, once, alone on stdout.

    Example: KEY=$(tokenmill keys create acme)
    """
    engine = ledger_engine()
    tenant = ensure_tenant(engine, name)
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
        typer.echo(store.webhook_secret(ledger_engine(), name, rotate=rotate))
    except store.NotFound as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from e


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="the key, or its id")]) -> None:
    """Revoke a key: requests with it are refused from now on.

    Example: tokenmill keys revoke tm-...
    """
    if not store.revoke_api_key(ledger_engine(), key):
        console.print("[red]no such key[/red]")
        raise typer.Exit(1)
    console.print("revoked")
