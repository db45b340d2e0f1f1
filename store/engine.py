"""Engines for SQLite (the embedded default) and PostgreSQL.

SQLite is set up for several processes writing one file: WAL, a busy timeout, foreign keys, and
write transactions opened with ``BEGIN IMMEDIATE`` (see :func:`write_transaction`) so that two
writers queue on the busy timeout instead of failing on a read-to-write lock upgrade.

Fork safety: pooled connections must not cross a fork. In a Celery prefork child call
``engine.dispose(close=False)`` (e.g. from ``worker_process_init``) or create the engine there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from store.log_redaction import install_log_redaction

__all__ = [
    "SQLITE_BUSY_TIMEOUT_MS",
    "dialect_insert",
    "is_postgresql",
    "make_engine",
    "normalize_url",
    "write_transaction",
]

# Long enough to wait out a large ingest chunk or another process's result batch.
SQLITE_BUSY_TIMEOUT_MS = 60_000
_WRITE_OPTION = "tokenmill_write"


def normalize_url(url: str | sa.URL) -> sa.URL:
    """Rewrite ``postgres://`` and ``postgresql://`` to the psycopg 3 driver."""
    text = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    for prefix in ("postgres://", "postgresql://"):
        if text.startswith(prefix):
            text = "postgresql+psycopg://" + text[len(prefix) :]
            break
    return sa.make_url(text)


def is_postgresql(bind: Engine | Connection) -> bool:
    return bind.dialect.name == "postgresql"


def dialect_insert(conn: Connection, table: Any) -> postgresql.Insert | sqlite.Insert:
    """``INSERT`` into ``table`` in ``conn``'s dialect, which has ``ON CONFLICT`` (both spell it
    ``on_conflict_do_nothing`` / ``on_conflict_do_update`` and offer ``excluded``)."""
    return postgresql.insert(table) if is_postgresql(conn) else sqlite.insert(table)


def make_engine(url: str | sa.URL, **kwargs: Any) -> Engine:
    """An engine for ``url``; extra keyword arguments go to ``sqlalchemy.create_engine``.

    Statement parameters (prompts, among others) are kept out of error messages, and every log
    record of the process is cleaned of database errors' quoted data (``store.log_redaction``):
    each process that can meet a database error makes an engine first."""
    install_log_redaction()
    kwargs.setdefault("hide_parameters", True)
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        engine = sa.create_engine(parsed, connect_args=connect_args, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return sa.create_engine(parsed, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event decide how transactions start (pysqlite's own
        # implicit BEGIN is deferred and cannot be made IMMEDIATE).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that will write: committed on success, rolled back on error."""
    with engine.connect() as conn:
        conn.execution_options(**{_WRITE_OPTION: True})
        with conn.begin():
            yield conn
