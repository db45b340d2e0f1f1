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
