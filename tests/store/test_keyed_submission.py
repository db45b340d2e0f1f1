"""``store.submit_interactive_for_key``: a single call's key look-up and rows together, on
PostgreSQL in one statement (its own transaction) for a tenant without a quota, the quota's way
for one with a quota, and nothing written for a key the ledger does not know (SQLite and
PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

import store
from store.ids import new_id
from store.interactive import KeyedSubmission, submit_interactive_for_key
from store.quotas import set_tenant_quotas
from tests.store.test_quotas import rows_of

CHAT_PATH = "/v1/chat/completions"


def chat(content: str = "hi") -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}


def submit(engine: Engine, key: str, body: dict[str, Any] | None = None) -> KeyedSubmission | None:
    return submit_interactive_for_key(
        engine, key, body if body is not None else chat(), endpoint=CHAT_PATH, request_id=new_id("batch_req_")
    )


def queued(engine: Engine, request_id: str) -> tuple[str, str, str]:
    """(tenant, status, batch's tenant) of the request's row."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(
                store.Request.tenant_id, store.Request.status, store.Batch.tenant_id.label("batch_tenant")
            )
            .join(store.Batch, store.Batch.id == store.Request.batch_id)
            .where(store.Request.id == request_id)
        ).one()
    return row.tenant_id, row.status, row.batch_tenant


def test_a_known_keys_call_is_queued_for_its_tenant_with_its_weight(engine: Engine) -> None:
    tenant = store.create_tenant(engine, "acme")
    store.set_tenant_weight(engine, tenant.id, 3.0)
    other = store.create_tenant(engine, "other")
    key = store.create_api_key(engine, tenant.id, "k")
    store.create_api_key(engine, other.id, "k")
    keyed = submit(engine, key)
    assert keyed is not None
    assert (keyed.tenant_id, keyed.weight) == (tenant.id, 3.0)
    assert queued(engine, keyed.submitted.request_id) == (tenant.id, store.RequestStatus.QUEUED, tenant.id)
    assert rows_of(engine, other.id) == (0, 0)


@pytest.mark.parametrize("body", [None, {"model": "gpt-4o-mini"}], ids=["good body", "bad body"])
def test_an_unknown_or_revoked_key_writes_nothing_whatever_its_body(
    engine: Engine, body: dict[str, Any] | None
) -> None:
    tenant = store.create_tenant(engine, "acme")
    key = store.create_api_key(engine, tenant.id, "k")
    assert store.revoke_api_key(engine, key)
    assert submit(engine, key, body) is None
    assert submit(engine, "tm-nobody", body) is None
    assert rows_of(engine, tenant.id) == (0, 0)


def test_a_known_keys_bad_body_is_refused_by_name(engine: Engine) -> None:
    tenant = store.create_tenant(engine, "acme")
    key = store.create_api_key(engine, tenant.id, "k")
    with pytest.raises(store.InvalidArgument) as refused:
        submit(engine, key, {"model": "gpt-4o-mini"})
    assert refused.value.param == "messages"
    assert rows_of(engine, tenant.id) == (0, 0)


def test_a_tenant_with_a_quota_is_held_to_it(engine: Engine) -> None:
    tenant = store.create_tenant(engine, "acme")
    key = store.create_api_key(engine, tenant.id, "k")
    set_tenant_quotas(engine, tenant.id, max_queued_requests=1)
    first = submit(engine, key)
    assert first is not None
    with pytest.raises(store.QuotaExceeded):
        submit(engine, key)
    assert rows_of(engine, tenant.id) == (1, 1)


def test_without_a_quota_the_look_up_and_the_rows_are_one_statement_and_no_transaction(
    pg_engine: Engine,
) -> None:
    """Four round trips were a look-up, BEGIN, the rows and COMMIT (PostgreSQL)."""
    tenant = store.create_tenant(pg_engine, "acme")
    key = store.create_api_key(pg_engine, tenant.id, "k")
    sent: list[str] = []
    commits: list[object] = []
    event.listen(pg_engine, "before_cursor_execute", lambda _c, _k, statement, *_: sent.append(statement))
    event.listen(pg_engine, "commit", commits.append)
    keyed = submit(pg_engine, key)
    assert keyed is not None
    (statement,) = sent
    assert "set_config('synchronous_commit', 'off', true)" in statement
    assert commits == []
    assert queued(pg_engine, keyed.submitted.request_id)[1] == store.RequestStatus.QUEUED
