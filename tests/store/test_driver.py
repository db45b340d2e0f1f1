"""``store.driver.DriverStatement``: a statement run on psycopg's cursor keeps what SQLAlchemy's
way gives its callers: SQLAlchemy's errors without the parameters in them, a dead connection
invalidated rather than pooled again, the pooled connection handed back transactional, and the
engine's statement listeners (PostgreSQL)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

import store
from store.driver import DriverStatement
from store.engine import normalize_url, write_transaction

SECRET = "the prompt nobody may read in a log"


@pytest.fixture
def one_connection(postgres_url: str) -> Iterator[Engine]:
    """An engine whose pool holds one connection: every run takes the same one."""
    store.upgrade_to_head(postgres_url)
    engine = store.make_engine(postgres_url, pool_size=1, max_overflow=0)
    try:
        yield engine
    finally:
        engine.dispose()


def tenant_named() -> DriverStatement:
    return DriverStatement(
        sa.insert(store.Tenant)
        .values(id=sa.bindparam("id"), name=sa.bindparam("name"), created_at=0, weight=1.0)
        .returning(store.Tenant.id, store.Tenant.name)
    )


def test_it_runs_its_own_transaction_and_returns_its_rows(one_connection: Engine) -> None:
    [row] = tenant_named().run(one_connection, {"id": "t1", "name": "acme"})
    assert (row.id, row.name) == ("t1", "acme")
    tenant = store.get_tenant(one_connection, "t1")  # committed
    assert tenant is not None
    assert tenant.name == "acme"


def test_a_refused_statement_raises_sqlalchemys_error_without_its_parameters(one_connection: Engine) -> None:
    tenant_named().run(one_connection, {"id": "t1", "name": "acme"})
    with pytest.raises(sa.exc.IntegrityError) as refused:
        tenant_named().run(one_connection, {"id": "t1", "name": SECRET})
    assert SECRET not in str(refused.value)
    assert not refused.value.connection_invalidated
    # The connection is fine and goes on serving.
    assert tenant_named().run(one_connection, {"id": "t2", "name": "other"})


def test_a_dead_connection_is_invalidated_and_the_next_run_gets_a_live_one(
    one_connection: Engine, postgres_url: str
) -> None:
    tenant_named().run(one_connection, {"id": "t1", "name": "acme"})
    [pid] = DriverStatement(sa.select(sa.func.pg_backend_pid().label("pid"))).run(one_connection, {})
    killer = sa.create_engine(normalize_url(postgres_url), poolclass=sa.NullPool)
    with killer.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid.pid})
    killer.dispose()
    with pytest.raises(sa.exc.OperationalError) as lost:
        tenant_named().run(one_connection, {"id": "t2", "name": "other"})
    assert lost.value.connection_invalidated
    [row] = tenant_named().run(one_connection, {"id": "t3", "name": "third"})
    assert row.id == "t3"


def test_a_connection_found_dead_renews_the_whole_pool(postgres_url: str) -> None:
    """As SQLAlchemy's way does: when a restart (or an operator) ended every pooled connection, the
    first run to meet a dead one fails and the pool renews all of them, so the runs after it get
    live connections, not one failure for each connection the pool held (up to 40 in the API)."""
    store.upgrade_to_head(postgres_url)
    # Connections used a moment ago are not pinged: a busy process's, whose pool is all recent.
    engine = store.make_engine(postgres_url, pool_size=3, max_overflow=0, idle_ping_seconds=3600)
    try:
        held = [engine.raw_connection() for _ in range(3)]
        for connection in held:
            connection.close()
        killer = sa.create_engine(normalize_url(postgres_url), poolclass=sa.NullPool)
        others = "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        with killer.connect() as conn:
            conn.execute(sa.text(f"SELECT pg_terminate_backend(pid) {others}"))
            # Gone once the server says so, not after a sleep.
            while conn.execute(sa.text(f"SELECT count(*) {others}")).scalar_one():
                conn.rollback()
        killer.dispose()
        slow = DriverStatement(sa.select(sa.func.pg_sleep(0.3).label("slept")))
        with pytest.raises(sa.exc.OperationalError):
            slow.run(engine, {})
        failures: list[BaseException] = []

        def run() -> None:
            try:
                slow.run(engine, {})
            except sa.exc.DBAPIError as error:
                failures.append(error)

        runs = [threading.Thread(target=run) for _ in range(3)]  # each holds its own connection
        for thread in runs:
            thread.start()
        for thread in runs:
            thread.join()
        assert failures == []
    finally:
        engine.dispose()


def test_a_database_out_of_reach_raises_sqlalchemys_error() -> None:
    """No connection to be had (the server down, restarting): SQLAlchemy's OperationalError, as
    ``engine.connect()`` raises, which is what callers tell an unreachable database by
    (workers.result_writer), not psycopg's own."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    engine = store.make_engine(f"postgresql://postgres@127.0.0.1:{port}/nowhere")
    try:
        with pytest.raises(sa.exc.OperationalError) as unreachable, engine.connect():
            pass
        with pytest.raises(sa.exc.OperationalError) as out_of_reach:
            tenant_named().run(engine, {"id": "t1", "name": SECRET})
        assert type(out_of_reach.value) is type(unreachable.value)
        assert SECRET not in str(out_of_reach.value)
    finally:
        engine.dispose()


def test_the_connection_goes_back_to_the_pool_transactional(one_connection: Engine) -> None:
    """Run in autocommit, handed back as it came: a transaction on it afterwards still rolls back."""
    tenant_named().run(one_connection, {"id": "t1", "name": "acme"})

    def rename_then_fail() -> None:
        with write_transaction(one_connection) as conn:
            conn.execute(sa.update(store.Tenant).where(store.Tenant.id == "t1").values(name="renamed"))
            raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError):
        rename_then_fail()
    tenant = store.get_tenant(one_connection, "t1")
    assert tenant is not None
    assert tenant.name == "acme"


def test_the_engines_statement_listeners_see_it(one_connection: Engine) -> None:
    seen: list[str] = []
    event.listen(
        one_connection, "before_cursor_execute", lambda _c, _k, statement, *_: seen.append(statement)
    )
    statement = tenant_named()
    statement.run(one_connection, {"id": "t1", "name": "acme"})
    assert seen == [statement.sql]


def test_a_statement_whose_sql_depends_on_its_values_is_refused() -> None:
    with pytest.raises(ValueError, match="must not depend"):
        DriverStatement(
            sa.select(store.Tenant.id).where(store.Tenant.id.in_(sa.bindparam("ids", expanding=True)))
        )
