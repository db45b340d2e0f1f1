"""One registry per side for request kinds: every kind the ledger knows has one entry in
``store.REQUEST_KINDS`` (endpoint, body check, short form) and one handler in
``workers.handlers.KIND_HANDLERS``, and ingest takes exactly the registered endpoints."""

from __future__ import annotations

import io

import pytest

import store
from workers.handlers import KIND_HANDLERS


def test_every_kind_has_one_entry_on_each_side() -> None:
    store_kinds = [spec.kind for spec in store.REQUEST_KINDS.values()]
    assert sorted(store_kinds) == sorted(store.RequestKind)  # one entry each, none missing
    assert set(KIND_HANDLERS) == set(store.RequestKind)
    assert all(endpoint == spec.endpoint for endpoint, spec in store.REQUEST_KINDS.items())
    assert dict(store.ENDPOINT_KINDS) == {e: spec.kind for e, spec in store.REQUEST_KINDS.items()}


@pytest.mark.parametrize("endpoint", sorted(store.REQUEST_KINDS))
def test_each_registered_endpoint_takes_a_short_form_line(endpoint: str, sqlite_url: str) -> None:
    store.upgrade_to_head(sqlite_url)
    engine = store.make_engine(sqlite_url)
    try:
        tenant = store.create_tenant(engine, "t")
        report = store.ingest_batch(
            engine,
            io.BytesIO(b'{"prompt": "hi"}\n{"prompt": 3}\n'),
            tenant_id=tenant.id,
            endpoint=endpoint,
            defaults={"model": "m"},
            skip_invalid=True,
        )
        assert (report.accepted, report.invalid_lines) == (1, 1)
        batch = store.get_batch(engine, report.batch_id)
        assert batch is not None
        assert batch.kind == store.REQUEST_KINDS[endpoint].kind
    finally:
        engine.dispose()


def test_an_unregistered_endpoint_is_refused_by_name() -> None:
    with pytest.raises(store.InvalidArgument) as refused:
        store.prepare_batch(tenant_id="t", endpoint="/v1/embeddings")
    assert refused.value.param == "endpoint"
    assert all(endpoint in str(refused.value) for endpoint in store.REQUEST_KINDS)
