"""Alembic environment: runs on the engine ``store.schema`` hands over, or on ``sqlalchemy.url`` /
``TOKENMILL_DATABASE_URL`` when the ``alembic`` command is used directly."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy.engine import Engine

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


def run_migrations_online() -> None:
    engine, owned = _engine()
    try:
        with engine.connect() as connection:
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
