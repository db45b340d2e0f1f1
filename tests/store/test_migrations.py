from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

import store


def test_upgrade_empty_database_to_head_then_downgrade_to_base(database_url: str) -> None:
    engine = store.make_engine(database_url)
    try:
        with pytest.raises(store.SchemaBehind, match=r"run `tokenmill db upgrade`"):
            store.require_schema_at_head(engine)
        store.upgrade_to_head(engine)
        store.require_schema_at_head(engine)
        assert store.current_revision(engine) == store.head_revision()
        tables = set(sa.inspect(engine).get_table_names())
        assert set(store.Base.metadata.tables) <= tables
        store.upgrade_to_head(engine)  # idempotent
        store.downgrade_to_base(engine)
        assert store.current_revision(engine) is None
        assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_autogenerate_finds_no_difference_at_head(database_url: str) -> None:
    store.upgrade_to_head(database_url)
    engine = store.make_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, store.Base.metadata) == []
    finally:
        engine.dispose()


def test_schema_behind_names_both_revisions(database_url: str) -> None:
    engine = store.make_engine(database_url)
    try:
        with pytest.raises(store.SchemaBehind) as caught:
            store.require_schema_at_head(engine)
        assert caught.value.current is None
        assert caught.value.expected == store.head_revision()
        assert store.head_revision() in str(caught.value)
    finally:
        engine.dispose()


def test_seeded_prices_cover_well_known_models(database_url: str) -> None:
    store.upgrade_to_head(database_url)
    engine = store.make_engine(database_url)
    try:
        prices = store.get_prices(engine)
        for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1-mini", "o4-mini"):
            assert prices[model].input_per_million > prices[model].cached_input_per_million > 0
    finally:
        engine.dispose()


def test_make_engine_rewrites_postgres_urls_to_psycopg() -> None:
    from store.engine import normalize_url

    for url in ("postgres://u@h/db", "postgresql://u@h/db", "postgresql+psycopg://u@h/db"):
        assert normalize_url(url).drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def test_downgrade_and_upgrade_again_keep_every_tenants_data(database_url: str) -> None:
    """SQLite rebuilds a table to drop a column; with foreign keys on, dropping the old table
    would fire every ``ON DELETE CASCADE`` and wipe the rows that point at it."""
    from alembic import command

    from store.schema import alembic_config
    from tests.store.conftest import chat_line, jsonl
    from tests.store.test_results import success

    store.upgrade_to_head(database_url)
    engine = store.make_engine(database_url)
    try:
        tenant = store.create_tenant(engine, "acme")
        store.create_api_key(engine, tenant.id)
        batch = store.ingest_batch(engine, jsonl([chat_line("c0"), chat_line("c1")]), tenant_id=tenant.id)
        ids = store.pending_request_ids(engine, batch.batch_id)
        store.record_results(engine, [success(ids[0])])
        tables = ("tenants", "api_keys", "batches", "requests", "results")

        def counts() -> dict[str, int]:
            with engine.connect() as conn:
                return {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one() for t in tables}

        before = counts()
        assert before == {"tenants": 1, "api_keys": 1, "batches": 1, "requests": 2, "results": 1}
        command.downgrade(alembic_config(engine), "0005")
        assert counts() == before
        store.upgrade_to_head(engine)
        assert counts() == before
        if engine.dialect.name == "sqlite":  # the pooled connection is handed back with its checks on
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    finally:
        engine.dispose()


def test_the_stored_bytes_counter_starts_as_the_uploads_already_kept(database_url: str) -> None:
    """0018: a tenant's ``stored_file_bytes`` starts as the sum of its uploads (batch output and
    error files do not count), so a cap set after the upgrade counts what was stored before it."""
    from alembic import command

    from store.schema import alembic_config

    engine = store.make_engine(database_url)
    try:
        command.upgrade(alembic_config(engine), "0017")
        file_row = (
            "INSERT INTO files (id, tenant_id, filename, purpose, bytes, created_at, status, kind) "
            "VALUES (:id, :tenant, 'f', 'batch', :bytes, 0, 'processed', :kind)"
        )
        with engine.begin() as conn:
            for tenant in ("full", "empty"):
                conn.execute(
                    sa.text("INSERT INTO tenants (id, name, created_at) VALUES (:id, :id, 0)"), {"id": tenant}
                )
            for file_id, size, kind in (
                ("u1", 300, "upload"),
                ("u2", 200, "upload"),
                ("o1", 900, "batch_output"),
            ):
                conn.execute(
                    sa.text(file_row), {"id": file_id, "tenant": "full", "bytes": size, "kind": kind}
                )
        store.upgrade_to_head(engine)
        assert store.quota_status(engine, "full").stored_bytes == 500
        assert store.quota_status(engine, "empty").stored_bytes == 0
    finally:
        engine.dispose()


def test_0019_replaces_an_index_a_failed_concurrent_build_left_invalid(postgres_url: str) -> None:
    """A ``CREATE INDEX CONCURRENTLY`` that fails (cancelled, the migration killed mid-build, a
    deadlock) leaves its index behind, invalid: never used by a query, yet kept up by every write.
    0019 created its indexes ``IF NOT EXISTS``, so the rerun kept the invalid one and dropped the
    old indexes: every page of batches walked the table."""
    from alembic import command

    from store.schema import alembic_config
    from tests.store.conftest import chat_line, jsonl

    engine = store.make_engine(postgres_url)
    try:
        command.upgrade(alembic_config(engine), "0018")
        tenant = store.create_tenant(engine, "t")
        store.ingest_batch(engine, jsonl([chat_line("a")]), tenant_id=tenant.id)
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            with pytest.raises(sa.exc.DataError):  # the build fails on the row: division by zero
                conn.execute(
                    sa.text(
                        "CREATE INDEX CONCURRENTLY ix_batches_listed_created_at_id ON batches "
                        "((1 / (priority - priority)))"
                    )
                )
        store.upgrade_to_head(engine)
        with engine.connect() as conn:
            indexes = {
                name: valid
                for name, valid in conn.execute(
                    sa.text(
                        "SELECT c.relname, i.indisvalid FROM pg_index i "
                        "JOIN pg_class c ON c.oid = i.indexrelid "
                        "WHERE c.relname LIKE 'ix_batches_%created_at_id'"
                    )
                )
            }
            definition = conn.execute(
                sa.text("SELECT pg_get_indexdef('ix_batches_listed_created_at_id'::regclass)")
            ).scalar_one()
        assert indexes == {
            "ix_batches_listed_tenant_id_created_at_id": True,
            "ix_batches_listed_created_at_id": True,
            "ix_batches_webhook_pending_created_at_id": True,
        }
        assert "(created_at, id) WHERE (hidden IS FALSE)" in definition, definition
    finally:
        engine.dispose()
