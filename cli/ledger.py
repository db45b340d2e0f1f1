"""What the commands on the ledger share: its engine (refused while the schema is behind), the
tenant a command acts for, and the console their messages go to (stderr: stdout is for results)."""

from __future__ import annotations

import typer
from rich.console import Console
from sqlalchemy.engine import Engine

import store
from config import get_settings

__all__ = ["console", "ensure_tenant", "ledger_engine"]

console = Console(stderr=True)


def ledger_engine() -> Engine:
    engine = store.make_engine(get_settings().database_url)
    try:
        store.require_schema_at_head(engine)
    except store.SchemaBehind as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from e
    return engine


def ensure_tenant(engine: Engine, name: str) -> store.Tenant:
    return store.get_tenant(engine, name) or store.create_tenant(engine, name, tenant_id=name)
