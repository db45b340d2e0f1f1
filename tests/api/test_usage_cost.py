"""``GET /v1/usage`` reports cost as the exact decimal the ledger holds, not a float's drift."""

from __future__ import annotations

import io
import json
from decimal import Decimal

import httpx

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
