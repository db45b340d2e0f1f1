"""Engines for SQLite (the embedded default) and PostgreSQL.

SQLite is set up for several processes writing one file: WAL, a busy timeout, foreign keys, and
write transactions opened with ``BEGIN IMMEDIATE`` (see :func:`write_transaction`) so that two
writers queue on the busy timeout instead of failing on a read-to-write lock upgrade.

Fork safety: pooled connections must not cross a fork. In a Celery prefork child call
``engine.dispose(close=False)`` (e.g. from ``worker_process_init``) or create the engine there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from store.clock import track_database_clock
from store.log_redaction import install_log_redaction

__all__ = [
    "IDLE_PING_SECONDS",
    "SQLITE_BUSY_TIMEOUT_MS",
    "again_if_disconnected",
    "autocommit_connection",
    "connection_is_lost",
    "dialect_insert",
    "driver_error",
    "flush_with_next_durable_commit",
    "is_postgresql",
    "make_engine",
    "no_flush_wait_column",
    "normalize_url",
    "write_transaction",
]

# Long enough to wait out a large ingest chunk or another process's result batch.
SQLITE_BUSY_TIMEOUT_MS = 60_000
# A pooled PostgreSQL connection idle this long is pinged before use (``make_engine``).
IDLE_PING_SECONDS = 1.0
_CHECKED_IN_AT = "tokenmill_checked_in_at"
_logger = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")
_WRITE_OPTION = "tokenmill_write"
# SQLSTATE read_only_sql_transaction: a session on a server that cannot write (the old primary
# after a failover, a replica behind the writer's name). New sessions reach the primary; this
# one never will.
_READ_ONLY_SQLSTATE = "25006"


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


def make_engine(url: str | sa.URL, *, idle_ping_seconds: float = IDLE_PING_SECONDS, **kwargs: Any) -> Engine:
    """An engine for ``url``; extra keyword arguments go to ``sqlalchemy.create_engine``. A pooled
    PostgreSQL connection is pinged before use once idle ``idle_ping_seconds`` (unless
    ``pool_pre_ping=True`` pings it at every checkout).

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
    ping_every_checkout = kwargs.pop("pool_pre_ping", False)
    if "poolclass" not in kwargs:
        # The connection handed back last is the next one out: a first-in-first-out pool walks
        # every connection a burst opened, so between bursts each sits idle long enough to be
        # pinged (one more round trip) and none stays warm (psycopg prepares a statement on a
        # connection only at its fifth run there).
        kwargs.setdefault("pool_use_lifo", True)
    engine = sa.create_engine(parsed, pool_pre_ping=ping_every_checkout, **kwargs)
    _renew_read_only_connections(engine)
    if not ping_every_checkout:
        _ping_connections_idle_since(engine, idle_ping_seconds)
    track_database_clock(engine)  # after the ping: a checkout measures on a live connection
    return engine


def connection_is_lost(engine: Engine, error: BaseException, dbapi_connection: Any) -> bool:
    """Whether ``error`` (the driver's) shows ``dbapi_connection`` useless: the dialect's
    disconnects, and a session left read-only by a failover, whose every write would fail until
    the process restarted. Such a connection is invalidated with the whole pool (the others went
    to the same server), and ``again_if_disconnected`` goes once more on a fresh one."""
    if _left_read_only(error):
        return True
    return bool(engine.dialect.is_disconnect(error, dbapi_connection, None))  # type: ignore[arg-type]


def _left_read_only(error: BaseException) -> bool:
    return getattr(error, "sqlstate", None) == _READ_ONLY_SQLSTATE


def driver_error(
    engine: Engine, error: Exception, connection: Any, statement: str, parameters: Any
) -> sa.exc.DBAPIError:
    """What SQLAlchemy raises for ``error`` of ``statement``, run on the driver past it (a compiled
    statement, a COPY) on the pooled ``connection``: as its own handling does, a connection lost
    (``connection_is_lost``) renews the pool's other connections too (at their next checkout: a
    restart or an operator ended them all, and one used a moment ago is not pinged) and says so
    (``connection_invalidated``, which ``again_if_disconnected`` and the API's 503 read)."""
    lost = connection_is_lost(engine, error, connection)
    if lost:
        engine.pool._invalidate(connection, error)
    raised = sa.exc.DBAPIError.instance(
        statement,
        parameters,
        error,
        engine.dialect.loaded_dbapi.Error,
        hide_parameters=True,
        connection_invalidated=lost,
        dialect=engine.dialect,
    )
    assert isinstance(raised, sa.exc.DBAPIError)  # a driver's error is wrapped as one
    return raised


def _renew_read_only_connections(engine: Engine) -> None:
    """For SQLAlchemy's own statements (``store.driver`` asks ``connection_is_lost``): a session
    left read-only counts as a disconnect, so SQLAlchemy invalidates the pool and says so
    (``connection_invalidated``)."""

    @event.listens_for(engine, "handle_error")
    def _on_error(context: sa.engine.ExceptionContext) -> None:
        if _left_read_only(context.original_exception):
            context.is_disconnect = True


def _ping_connections_idle_since(engine: Engine, seconds: float) -> None:
    """Ping a pooled connection before use only when it sat idle ``seconds`` or more.

    A ping on every checkout is one more round trip per transaction, a third of a one-statement
    read's (the ping, the statement, the rollback). A connection handed back a moment ago is alive
    but for a server restart or a killed backend within that moment: then the statement fails,
    SQLAlchemy sees the disconnect and renews the whole pool, and the caller's retry (the next
    request, the sweeper) finds fresh connections. A connection idle longer is pinged, and
    replaced if dead, before anything runs on it."""

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[_CHECKED_IN_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        checked_in_at = record.info.get(_CHECKED_IN_AT)
        if checked_in_at is None or time.monotonic() - checked_in_at < seconds:
            return  # new (just connected), or used a moment ago
        dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except dbapi_error as error:
            if not connection_is_lost(engine, error, dbapi_connection):
                raise
            alive = False
        if not alive:
            # The pool discards this connection and checks out (or opens) another.
            raise sa.exc.DisconnectionError("a pooled connection idle since its last use is gone")


def again_if_disconnected(function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``function(*args, **kwargs)``, once more if its connection died under it (PostgreSQL
    restarted, its backend terminated): the disconnect renewed the pool, so the second goes on a
    fresh connection. A connection handed back a moment ago is not pinged (``make_engine``): for
    a statement whose failure costs more than a caller's retry (a single call's claim or paid
    answer), and that is safe to run twice: a result that did commit makes the second a
    duplicate; a claim that did commit makes the second claim nothing, and that request waits for
    its lease to lapse and the sweeper, as it did before."""
    try:
        return function(*args, **kwargs)
    except sa.exc.DBAPIError as error:
        if not error.connection_invalidated:
            raise
        _logger.warning("a connection died under %s; going again", getattr(function, "__name__", function))
    return function(*args, **kwargs)


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


def flush_with_next_durable_commit(conn: Connection) -> None:
    """Let the transaction open on ``conn`` commit without waiting for its WAL to reach the disk
    (PostgreSQL's ``synchronous_commit = off`` for this transaction only; SQLite: nothing).

    Its rows are visible to every other session at once; only a crash of PostgreSQL itself (not
    of our processes) in the next few hundred milliseconds can take it back. The next durable
    commit of any session flushes the WAL up to its own record, this one's included: a write
    whose loss could only be seen after a later durable commit (a single call's row and claim,
    whose caller hears of them only through the durable commit of the result) saves a disk flush
    without ever telling anyone of a row that a crash could take back."""
    if is_postgresql(conn):
        conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")


def no_flush_wait_column() -> sa.ColumnElement[Any]:
    """``flush_with_next_durable_commit`` from within a statement, as a column to select: a
    statement that is its own transaction (autocommit) sets it for itself, without a round trip."""
    return sa.func.set_config(
        sa.literal_column("'synchronous_commit'"), sa.literal_column("'off'"), sa.true()
    )


@contextmanager
def autocommit_connection(engine: Engine) -> Iterator[Connection]:
    """A connection on which each statement is a transaction of its own: no ``BEGIN`` before it
    and no ``COMMIT`` / ``ROLLBACK`` after it, two round trips that would cost as much again as a
    one-statement read or write (the API key look-up of every request; a claim). Nor does it end
    in a rollback, which makes psycopg drop every statement it prepared on the connection: a
    read that runs often on connections that also claim and record belongs here. Only for work
    that is one statement, or needs no snapshot or atomicity across its statements."""
    with engine.connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that will write: committed on success, rolled back on error."""
    with engine.connect() as conn:
        conn.execution_options(**{_WRITE_OPTION: True})
        with conn.begin():
            yield conn
