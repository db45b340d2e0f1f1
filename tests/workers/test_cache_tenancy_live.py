"""Tenants apart through the whole deployment: ``tokenmill api`` with two tenants' keys, a real
``tokenmill worker`` on the shared Redis cache, PostgreSQL and the simulator over HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import store
from simulator.testing import SimulatorServer
from tests.api.conftest import start_api
from tests.cluster import Cluster
from tests.workers.support import Ledger

SECRET_PROMPT = "tenant a's unreleased product name is [[delay 1.0]]"


@pytest.fixture
def deployment(
    cluster: Callable[..., Cluster], make_ledger: Callable[[str], Ledger], postgres_url: str, tmp_path: Path
) -> Iterator[tuple[Cluster, Ledger, str]]:
    led = make_ledger(postgres_url)
    c = cluster()
    c.env["TOKENMILL_FILES_DIR"] = str(tmp_path / "files")
    process, root = start_api(c.env, tmp_path / "api.log")
    try:
        yield c, led, root
    finally:
        process.terminate()
        process.wait(timeout=10)


def ask(root: str, key: str) -> httpx.Response:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
    return httpx.post(
        f"{root}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def test_a_tenant_sending_another_tenants_prompt_pays_for_its_own_answer(
    deployment: tuple[Cluster, Ledger, str], simulator: SimulatorServer
) -> None:
    """Tenant B sends tenant A's exact prompt after A's answer is cached: B is not served A's
    answer (no hit, no telling latency, billed like any call), and a second ask of B's own is."""
    c, led, root = deployment
    c.worker("w1", concurrency=8)
    key_a = store.create_api_key(led.engine, led.tenant_id)
    key_b = store.create_api_key(led.engine, store.create_tenant(led.engine, "tenant b").id)
    first_a = ask(root, key_a)
    assert first_a.status_code == 200, first_a.text
    assert "tokenmill" not in first_a.json()
    from_b = ask(root, key_b)
    assert from_b.status_code == 200, from_b.text
    assert "tokenmill" not in from_b.json()  # not marked as served from the cache
    assert from_b.json()["id"] != first_a.json()["id"]  # not A's answer
    assert simulator.stats()["completions"] == 2
    again_b = ask(root, key_b)
    assert again_b.json()["tokenmill"]["cached"] is True  # B's own answer is B's to reuse
    assert simulator.stats()["completions"] == 2
    usage_b = httpx.get(
        f"{root}/v1/usage", params={"group_by": ""}, headers={"Authorization": f"Bearer {key_b}"}, timeout=30
    ).json()["data"]
    assert usage_b[0]["billed"]["requests"] == 1
    assert usage_b[0]["billed"]["prompt_tokens"] > 0
    assert usage_b[0]["cache_hits"]["requests"] == 1
