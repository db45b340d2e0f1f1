"""A hostile tenant against the single call's one-statement key look-up and rows
(``store.submit_interactive_for_key``), through the API on the real PostgreSQL, Redis and
simulator: a key the ledger does not know, or revoked, hears 401 whatever its body and queues
nothing; each known key's call is queued under its own tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

import store
from simulator.testing import SimulatorServer
from store.tables import MAX_MODEL_CHARS, Batch, Request
from tests.api.in_process import InProcess, in_process_api


@pytest.fixture
async def api(
    postgres_url: str, redis_url: str, redis_prefix: str, simulator: SimulatorServer
) -> AsyncIterator[InProcess]:
    async with in_process_api(postgres_url, redis_url, redis_prefix, simulator, "keyed-submit-lane") as api:
        yield api


def rows(api: InProcess) -> tuple[int, int]:
    """(requests, batches) in the whole ledger."""
    with api.app.state.engine.connect() as conn:
        requests = conn.execute(sa.select(sa.func.count()).select_from(Request)).scalar_one()
        batches = conn.execute(sa.select(sa.func.count()).select_from(Batch)).scalar_one()
    return int(requests), int(batches)


GOOD = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}
BODIES: list[Any] = [
    GOOD,
    {**GOOD, "stream": True},
    {"model": "sim-model"},  # no messages: the line check's 400, for a known key
    {**GOOD, "model": "m" * (MAX_MODEL_CHARS + 1)},
    {**GOOD, "stream": "yes"},  # the route's own 400, before the submit
    [1, 2],  # not an object
    {"model": "sim-model", "messages": [{"role": "user", "content": "a\u0000b"}]},
    {**GOOD, "seed": 10**40},
]


async def test_a_key_the_ledger_does_not_know_hears_401_whatever_its_body(api: InProcess) -> None:
    revoked = store.create_api_key(api.app.state.engine, api.tenant_id, "gone")
    assert store.revoke_api_key(api.app.state.engine, revoked)
    for key in ("tm-" + "x" * 40, revoked):
        for body in BODIES:
            answer = await api.client.post(
                "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            assert answer.status_code == 401, (body, answer.text)
            assert answer.json()["error"]["code"] == "invalid_api_key"
    assert rows(api) == (0, 0)


async def test_odd_keys_are_refused_and_queue_nothing(api: InProcess) -> None:
    for authorization in (
        b"Bearer ",
        b"Bearer  ",
        b"Bearer " + b"k" * 20_000,
        "Bearer tm-\u00e9\u00e8".encode("latin-1"),
        b"Bearer tm-\xff\xfe",
        b"Basic dG06eA==",
        b"Bearer tm-a tm-b",
        b"Bearer " + api.key.encode() + b"x",
        b"Bearer " + api.key[:-1].encode(),
    ):
        answer = await api.client.post(
            "/v1/chat/completions", json=GOOD, headers=[(b"authorization", authorization)]
        )
        assert answer.status_code == 401, (authorization[:40], answer.text)
    assert rows(api) == (0, 0)


async def test_each_keys_call_is_queued_under_its_own_tenant(api: InProcess) -> None:
    engine = api.app.state.engine
    other = store.create_tenant(engine, "other")
    other_key = store.create_api_key(engine, other.id, "k")
    for key, tenant_id in ((api.key, api.tenant_id), (other_key, other.id), (api.key, api.tenant_id)):
        answer = await api.client.post(
            "/v1/chat/completions", json=GOOD, headers={"Authorization": f"Bearer {key}"}
        )
        assert answer.status_code == 200, answer.text
        with engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    Request.tenant_id, Batch.tenant_id, Batch.status, Batch.completed_count, Batch.hidden
                )
                .join(Batch, Batch.id == Request.batch_id)
                .where(Request.id == answer.headers["x-request-id"])
            ).one()
        assert tuple(row) == (tenant_id, tenant_id, store.BatchStatus.COMPLETED, 1, True)
