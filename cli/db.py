"""``tokenmill db``: bring the ledger's schema to head, back to base, or show where it is."""

from __future__ import annotations

from typing import Annotated

import typer

import store
from config import get_settings

__all__ = ["db_app"]

db_app = typer.Typer(help="Manage the SQL ledger's schema.", no_args_is_help=True)

DatabaseOption = Annotated[
    str | None,
    typer.Option("--database-url", help="default: TOKENMILL_DATABASE_URL", show_default=False),
]


def _url(database_url: str | None) -> str:
    return database_url or get_settings().database_url


@db_app.command("upgrade")
def upgrade(database_url: DatabaseOption = None) -> None:
    """Create or migrate every table to the newest revision."""
    url = _url(database_url)
    store.upgrade_to_head(url)
    typer.echo(f"database is at revision {store.head_revision()} (head)")


@db_app.command("downgrade")
def downgrade(
    database_url: DatabaseOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="confirm: this drops every ledger table")] = False,
) -> None:
    """Drop every ledger table (all batches, results and usage are lost)."""
    if not yes:
        typer.echo("refusing to drop the ledger without --yes", err=True)
        raise typer.Exit(code=2)
    store.downgrade_to_base(_url(database_url))
    typer.echo("database is at base (empty)")


@db_app.command("current")
def current(database_url: DatabaseOption = None) -> None:
    """Print the database's revision and whether it is at head."""
    engine = store.make_engine(_url(database_url))
    try:
        revision = store.current_revision(engine)
    finally:
        engine.dispose()
    head = store.head_revision()
    state = "head" if revision == head else f"behind, head is {head}: run `tokenmill db upgrade`"
    typer.echo(f"{revision or 'base (empty)'} ({state})")
    if revision != head:
        raise typer.Exit(code=1)
