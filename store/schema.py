"""Schema revisions: bring a database to head, and refuse to run on one that is behind."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from store.engine import make_engine
from store.errors import SchemaBehind

__all__ = [
    "alembic_config",
    "current_revision",
    "downgrade_to_base",
    "head_revision",
    "require_schema_at_head",
    "upgrade_to_head",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic config for our migrations; with ``engine``, ``env.py`` runs on that engine."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def _run(url_or_engine: str | sa.URL | Engine, action: str) -> None:
    engine = url_or_engine if isinstance(url_or_engine, Engine) else make_engine(url_or_engine)
    try:
        config = alembic_config(engine)
        if action == "upgrade":
            command.upgrade(config, "head")
        else:
            command.downgrade(config, "base")
    finally:
        if engine is not url_or_engine:
            engine.dispose()


def upgrade_to_head(url_or_engine: str | sa.URL | Engine) -> None:
    """Create or migrate every table to the newest revision (idempotent)."""
    _run(url_or_engine, "upgrade")


def downgrade_to_base(url_or_engine: str | sa.URL | Engine) -> None:
    """Drop everything the migrations created."""
    _run(url_or_engine, "downgrade")


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migration revisions found in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def require_schema_at_head(engine: Engine) -> None:
    """Raise :class:`SchemaBehind` unless the database is at the head revision."""
    current, expected = current_revision(engine), head_revision()
    if current != expected:
        raise SchemaBehind(current, expected)
