"""``GET /v1/usage`` reports cost as the exact decimal the ledger holds, not a float's drift."""

from __future__ import annotations

import io
import json
from decimal import Decimal

import httpx
import sqlalchemy as sa

import store
from models.types import RequestUsage
from tests.api.conftest import LiveAPI
from tests.cluster import run_cli


def test_usage_cost_is_the_exact_decimal(live_api: LiveAPI) -> None:
    """Three calls of 100 prompt and 36 completion tokens at 0.15 / 0.6 dollars per million: in
    floats each costs 3.6599999999999995e-05 and the three 0.00010979999999999999."""
    key = live_api.new_key("exact cost")
    engine = store.make_engine(live_api.database_url)
    try:
        tenant = store.authenticate_api_key(engine, key)
        assert tenant is not None
        store.set_price(engine, "exact-cost-model", "0.15", "0.075", "0.6")
        lines = "\n".join(json.dumps({"custom_id": f"c{i}", "prompt": "hello"}) for i in range(3))
        batch = store.ingest_batch(
            engine, io.BytesIO(lines.encode()), tenant_id=tenant.id, defaults={"model": "exact-cost-model"}
        )
        usage = RequestUsage(prompt_tokens=100, completion_tokens=36)
        store.record_results(
            engine,
            [
                store.ResultRecord(
                    request_id,
                    store.RequestStatus.SUCCEEDED,
                    {},
                    model="exact-cost-model",
                    usage=usage,
                    upstream_request_id=f"answer-{request_id}",
                )
                for request_id in store.pending_request_ids(engine, batch.batch_id)
            ],
        )
    finally:
        engine.dispose()
    reply = httpx.get(
        f"{live_api.base_url}/usage",
        params={"group_by": ""},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    (row,) = json.loads(reply.text, parse_float=Decimal)["data"]
    assert row["billed"]["cost_usd"] == Decimal("0.0001098")
    assert '"cost_usd":0.0001098' in reply.text.replace(" ", "")
    # Wide enough that the table does not wrap the figure.
    shown = run_cli({**live_api.env, "COLUMNS": "300"}, "usage", "--group-by", "", "--tenant", tenant.id)
    assert shown.returncode == 0, shown.stderr
    assert "0.0001098" in shown.stdout


def test_a_usage_report_too_large_for_one_answer_is_refused_by_name(live_api: LiveAPI) -> None:
    """Each chat completion is a batch of its own in the ledger, so ``group_by=batch`` answered a
    row per single call ever made, all at once: 300,000 calls made a 90 MB answer that took the
    API 11 s of Python (every other tenant's calls on that process waiting) and 518 MB; a few
    million, gigabytes. Past 10,000 rows the report is refused with 400
    ``usage_report_too_large``, naming how to narrow it; a narrower report answers as before."""
    key = live_api.new_key("many single calls")
    engine = store.make_engine(live_api.database_url)
    try:
        tenant = store.authenticate_api_key(engine, key)
        assert tenant is not None
        with engine.begin() as conn:
            conn.execute(sa.text("SET session_replication_role = replica"))  # no request rows needed
            conn.execute(
                sa.text(
                    "INSERT INTO results (request_id, batch_id, tenant_id, status, status_code, "
                    "upstream_request_id, finish_reason, model, prompt_tokens, completion_tokens, "
                    "cached_prompt_tokens, reasoning_tokens, cached, latency_ms, attempts, created_at) "
                    "SELECT 'req_many' || g, 'batch_many' || g, :tenant, 'succeeded', 200, 'up' || g, "
                    "'stop', 'gpt-4o-mini', 12, 30, 0, 0, false, 100.0, 1, 1700000000 + g "
                    "FROM generate_series(1, 10001) g"
                ),
                {"tenant": tenant.id},
            )
    finally:
        engine.dispose()

    def usage(**params: str) -> httpx.Response:
        return httpx.get(
            f"{live_api.base_url}/usage",
            params=params,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )

    refused = usage(group_by="batch")
    assert refused.status_code == 400, refused.text[:300]
    error = refused.json()["error"]
    assert error["code"] == "usage_report_too_large"
    assert "since" in error["message"]
    narrowed = usage(group_by="batch", since="1700000001", until="1700005001")
    assert narrowed.status_code == 200, narrowed.text[:300]
    assert len(narrowed.json()["data"]) == 5000
    totals = usage(group_by="model")
    assert totals.status_code == 200, totals.text[:300]
    assert [row["requests"] for row in totals.json()["data"]] == [10001]
