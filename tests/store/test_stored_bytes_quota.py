"""The cap on a tenant's stored file bytes (``store.quotas``): an upload's row is added only if it
fits, checked under the tenant's row lock so that concurrent uploads never pass the cap together;
deleting an upload frees its bytes once; a batch's output and error files never count and are
written for a tenant at its cap (its results are never dropped). Before, nothing capped what a
tenant stored: one tenant could fill the files disk and fail every tenant's uploads."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import store
from store.quotas import FILE_STORAGE_QUOTA_EXCEEDED, reserve_stored_bytes
from tests.store.conftest import IngestFn, wait_for_a_lock_wait
from tests.store.test_results import success


def upload(engine: Engine, tenant_id: str, size: int, default: int | None = None) -> store.File:
    return store.create_file(
        engine, tenant_id, "in.jsonl", "batch", size, f"/data/{size}", default_max_stored_bytes=default
    )


def file_rows(engine: Engine, tenant_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).select_from(store.File).where(store.File.tenant_id == tenant_id)
            ).scalar_one()
        )


def test_an_upload_over_the_cap_adds_no_row_and_names_the_limit(engine: Engine, tenant: store.Tenant) -> None:
    store.set_tenant_quotas(engine, tenant.id, max_stored_bytes=1000)
    upload(engine, tenant.id, 600)
    with pytest.raises(store.QuotaExceeded) as refused:
        upload(engine, tenant.id, 401)
    assert refused.value.code == FILE_STORAGE_QUOTA_EXCEEDED
    assert "1000" in str(refused.value)
    assert "600" in str(refused.value)
    assert file_rows(engine, tenant.id) == 1
    upload(engine, tenant.id, 400)  # exactly to the cap
    status = store.quota_status(engine, tenant.id)
    assert (status.max_stored_bytes, status.stored_bytes, status.remaining_stored_bytes) == (1000, 1000, 0)


def test_the_default_applies_to_a_tenant_without_its_own_cap(engine: Engine, tenant: store.Tenant) -> None:
    upload(engine, tenant.id, 600, default=1000)
    with pytest.raises(store.QuotaExceeded):
        upload(engine, tenant.id, 600, default=1000)
    store.set_tenant_quotas(engine, tenant.id, max_stored_bytes=5000)
    upload(engine, tenant.id, 600, default=1000)  # its own cap wins over the default
    store.set_tenant_quotas(engine, tenant.id, max_stored_bytes=None)  # back to the default
    status = store.quota_status(engine, tenant.id, default_max_stored_bytes=1000)
    assert (status.max_stored_bytes, status.stored_bytes, status.remaining_stored_bytes) == (1000, 1200, 0)
    assert store.get_tenant_quotas(engine, tenant.id).max_stored_bytes is None


def test_deleting_an_upload_frees_its_bytes_once(engine: Engine, tenant: store.Tenant) -> None:
    store.set_tenant_quotas(engine, tenant.id, max_stored_bytes=1000)
    first = upload(engine, tenant.id, 1000)
    with pytest.raises(store.QuotaExceeded):
        upload(engine, tenant.id, 1)
    assert store.delete_file(engine, first.id, tenant.id) is not None
    assert store.delete_file(engine, first.id, tenant.id) is None  # gone: nothing freed twice
    assert store.quota_status(engine, tenant.id).stored_bytes == 0
    upload(engine, tenant.id, 1000)


def test_another_tenants_file_is_neither_deleted_nor_freed(engine: Engine, tenant: store.Tenant) -> None:
    other = store.create_tenant(engine, "other")
    file = upload(engine, other.id, 700)
    assert store.delete_file(engine, file.id, tenant.id) is None
    assert store.quota_status(engine, other.id).stored_bytes == 700


def test_two_concurrent_uploads_cannot_both_pass_a_cap_only_one_fits(postgres_url: str) -> None:
    """The first upload holds the tenant's row from its check to its commit; the second waits for
    it, then counts the first's bytes and is refused. Without the lock both would be added."""
    store.upgrade_to_head(postgres_url)
    engine = store.make_engine(postgres_url)
    try:
        tenant = store.create_tenant(engine, "racer")
        store.set_tenant_quotas(engine, tenant.id, max_stored_bytes=1000)
        first = engine.connect()
        transaction = first.begin()
        reserve_stored_bytes(first, tenant.id, 600, None)  # the first upload, before its commit
        outcome: list[BaseException | store.File] = []

        def second() -> None:
            try:
                outcome.append(upload(engine, tenant.id, 600))
            except BaseException as e:
                outcome.append(e)

        thread = threading.Thread(target=second)
        thread.start()
        wait_for_a_lock_wait(engine, thread, "upload", outcome)
        transaction.commit()
        first.close()
        thread.join(30)
        (result,) = outcome
        assert isinstance(result, store.QuotaExceeded), result
        assert result.code == FILE_STORAGE_QUOTA_EXCEEDED
        assert store.quota_status(engine, tenant.id).stored_bytes == 600
        assert file_rows(engine, tenant.id) == 0, "only the second's row would have been added"
    finally:
        engine.dispose()


def test_many_concurrent_uploads_fill_the_cap_exactly(postgres_url: str) -> None:
    store.upgrade_to_head(postgres_url)
    engine = store.make_engine(postgres_url, pool_size=8)
    try:
        tenant = store.create_tenant(engine, "crowd")
        store.set_tenant_quotas(engine, tenant.id, max_stored_bytes=1000)
        start = threading.Barrier(12)
        outcomes: list[str] = []

        def add(index: int) -> None:
            start.wait()
            try:
                upload(engine, tenant.id, 200)
                outcomes.append("stored")
            except store.QuotaExceeded as e:
                outcomes.append(e.code)

        threads = [threading.Thread(target=add, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(outcomes) == [FILE_STORAGE_QUOTA_EXCEEDED] * 7 + ["stored"] * 5
        assert store.quota_status(engine, tenant.id).stored_bytes == 1000
        assert file_rows(engine, tenant.id) == 5
    finally:
        engine.dispose()


def test_a_tenant_at_its_cap_still_gets_its_batch_output_files(
    engine: Engine, tenant: store.Tenant, ingest: IngestFn
) -> None:
    """Output and error files are generated from the ledger and never count: a batch of a tenant
    at its cap ends with both, and its next upload is what is refused."""
    batch = ingest(2)
    store.set_tenant_quotas(engine, tenant.id, max_stored_bytes=500)
    upload(engine, tenant.id, 500)
    ids = store.pending_request_ids(engine, batch.batch_id)
    assert store.record_results(engine, [success(request_id) for request_id in ids]).finalized_batches == [
        batch.batch_id
    ]
    ended = store.get_batch(engine, batch.batch_id)
    assert ended is not None
    assert ended.status == store.BatchStatus.COMPLETED
    assert ended.output_file_id is not None
    assert ended.error_file_id is not None
    written = store.get_file(engine, ended.output_file_id, tenant.id)
    assert written is not None
    [output] = store.with_bytes(engine, [written])
    assert (output.bytes or 0) > 0
    status = store.quota_status(engine, tenant.id)
    assert (status.stored_bytes, status.remaining_stored_bytes) == (500, 0), "results take none of the cap"
    with pytest.raises(store.QuotaExceeded):
        upload(engine, tenant.id, 1)


def test_quota_values_are_checked(engine: Engine, tenant: store.Tenant) -> None:
    with pytest.raises(store.InvalidArgument, match="max_stored_bytes"):
        store.set_tenant_quotas(engine, tenant.id, max_stored_bytes=-1)
    with pytest.raises(store.InvalidArgument, match="max_stored_bytes"):
        store.set_tenant_quotas(engine, tenant.id, max_stored_bytes=2**64)
