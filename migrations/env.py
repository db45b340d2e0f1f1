"""Alembic environment: runs on the engine ``store.schema`` hands over, or on ``sqlalchemy.url`` /
``TOKENMILL_DATABASE_URL`` when the ``alembic`` command is used directly."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from alembic import context
from sqlalchemy.engine import Connection, Engine

from store.engine import make_engine
from store.tables import Base

target_metadata = Base.metadata


def _engine() -> tuple[Engine, bool]:
    given = context.config.attributes.get("engine")
    if isinstance(given, Engine):
        return given, False
    url = context.config.get_main_option("sqlalchemy.url") or os.environ.get(
        "TOKENMILL_DATABASE_URL", "sqlite:///./tokenmill.db"
    )
    return make_engine(url), True


@contextmanager
def _foreign_keys_off(connection: Connection) -> Iterator[None]:
    """On SQLite, foreign keys off while migrating: batch mode drops a column by rebuilding the
    table and dropping the old one, and with the checks on that drop fires every ``ON DELETE
    CASCADE`` (a downgrade would delete every tenant's keys, batches and results). SQLite ignores
    the pragma inside a transaction, so it is set on the raw connection before ours begins, and
    set back before the pooled connection is returned."""
    if connection.dialect.name != "sqlite":
        yield
        return
    raw = connection.connection.driver_connection
    assert raw is not None
    raw.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
        # With the checks off a migration could leave dangling references: say so loudly.
        dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if dangling:
            raise RuntimeError(f"migration left rows with dangling foreign keys: {dangling[:5]}")
    finally:
        # Alembic commits each SQLite migration itself; what is open here is only reads.
        if connection.in_transaction():
            connection.rollback()
        raw.execute("PRAGMA foreign_keys=ON")


def run_migrations_online() -> None:
    engine, owned = _engine()
    try:
        with engine.connect() as connection, _foreign_keys_off(connection):
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                # SQLite cannot ALTER most things; batch mode recreates tables instead.
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        if owned:
            engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run against a database")
run_migrations_online()
