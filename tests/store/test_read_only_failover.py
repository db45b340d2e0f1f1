"""A failover leaves pooled connections on a server that is now read-only (a demoted primary, a
replica behind the old writer's name): every write on them fails with SQLSTATE 25006, while
new connections reach the writable primary. Such a connection is treated as lost, as one the
server closed: the pool is renewed, and the write goes through on a fresh connection, rather
than every write of the process failing until it restarts."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import store
from api.errors import database_unavailable
from store.driver import DriverStatement
from store.engine import again_if_disconnected, normalize_url
from tests import services


def _tenant_named() -> DriverStatement:
    return DriverStatement(
        sa.insert(store.Tenant)
        .values(id=sa.bindparam("id"), name=sa.bindparam("name"), created_at=0, weight=1.0)
        .returning(store.Tenant.id)
    )


@pytest.fixture
def pooled_on_a_read_only_server(postgres_url: str) -> Iterator[Engine]:
    """An engine whose pool holds connections opened while the database was read-only; new
    sessions are writable again (as after a failover, the name now pointing at the primary).
    Pooled connections are not pinged (a busy process's are all recent)."""
    store.upgrade_to_head(postgres_url)
    name = sa.make_url(postgres_url).database
    admin = sa.create_engine(normalize_url(services.postgres_admin_url()), isolation_level="AUTOCOMMIT")
    engine = store.make_engine(postgres_url, pool_size=2, max_overflow=0, idle_ping_seconds=3600)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
        held = [engine.connect() for _ in range(2)]
        for conn in held:
            assert conn.execute(sa.text("SHOW transaction_read_only")).scalar_one() == "on"
        for conn in held:
            conn.close()
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" RESET default_transaction_read_only'))
        yield engine
    finally:
        engine.dispose()
        admin.dispose()


def test_a_write_on_a_read_only_pooled_connection_goes_again_on_a_fresh_one(
    pooled_on_a_read_only_server: Engine,
) -> None:
    engine = pooled_on_a_read_only_server
    tenant = again_if_disconnected(store.create_tenant, engine, "after-failover")
    assert tenant.name == "after-failover"
    # Every pooled connection was renewed, not only the one that failed.
    [row] = _tenant_named().run(engine, {"id": "t-driver", "name": "by the driver"})
    assert row.id == "t-driver"


def test_a_driver_statement_on_a_read_only_pooled_connection_renews_the_pool(
    pooled_on_a_read_only_server: Engine,
) -> None:
    engine = pooled_on_a_read_only_server
    with pytest.raises(sa.exc.DBAPIError) as refused:
        _tenant_named().run(engine, {"id": "t1", "name": "first"})
    assert refused.value.connection_invalidated
    [row] = _tenant_named().run(engine, {"id": "t2", "name": "second"})
    assert row.id == "t2"
    with engine.begin() as conn:
        assert conn.execute(sa.text("SHOW transaction_read_only")).scalar_one() == "off"


def test_a_bulk_load_on_a_read_only_pooled_connection_renews_the_pool(
    pooled_on_a_read_only_server: Engine, postgres_url: str
) -> None:
    """A batch's lines go in by COPY, on the driver: its 25006 passed SQLAlchemy by, so the
    connection went back to the pool as it was (each fill after it failed the same way) and the
    API answered 500 internal_error, not 503 database_unavailable (nor went again)."""
    engine = pooled_on_a_read_only_server
    writable = store.make_engine(postgres_url)
    try:
        tenant = store.create_tenant(writable, "bulk")
        spec = store.open_batch(writable, store.prepare_batch(tenant_id=tenant.id))
    finally:
        writable.dispose()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    request = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    line = json.dumps(request).encode() + b"\n"
    with pytest.raises(sa.exc.DBAPIError) as refused:
        store.fill_batch(engine, spec, io.BytesIO(line))
    assert refused.value.connection_invalidated
    assert database_unavailable(refused.value) is not None
    report = again_if_disconnected(store.fill_batch, engine, spec, io.BytesIO(line))
    assert (report.status, report.accepted) == (store.BatchStatus.IN_PROGRESS, 1)
