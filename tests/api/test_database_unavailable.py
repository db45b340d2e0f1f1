"""The ledger out of reach (PostgreSQL restarting, failing over, refusing connections): the API
answers 503 ``database_unavailable`` with a Retry-After, a named error the SDK retries, not a 500
``internal_error`` (which says a bug of ours). Nothing was kept under an Idempotency-Key then: the
retry with the same key runs, once the database is back."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import event

import store
from api.app import create_app
from config import Settings
from store.engine import normalize_url
from store.tenants import create_api_key
from tests import services


class Ledger:
    def __init__(self, url: str) -> None:
        self.name = sa.make_url(url).database
        admin_url = normalize_url(services.postgres_admin_url())
        self.admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")

    def refuse_connections(self) -> None:
        """As a server restarting: every session ended, new ones refused."""
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false'))
            others = "FROM pg_stat_activity WHERE datname = :name AND pid <> pg_backend_pid()"
            conn.execute(sa.text(f"SELECT pg_terminate_backend(pid) {others}"), {"name": self.name})
            while conn.execute(sa.text(f"SELECT count(*) {others}"), {"name": self.name}).scalar_one():
                pass  # gone once the server says so

    def accept_connections(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true'))


def _tenant_key(postgres_url: str) -> str:
    """An API key of a new tenant in the ledger at ``postgres_url``, migrated to head."""
    store.upgrade_to_head(postgres_url)
    engine = store.make_engine(postgres_url)
    try:
        return create_api_key(engine, store.create_tenant(engine, "t").id)
    finally:
        engine.dispose()


@pytest.fixture
def api(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> Iterator[tuple[TestClient, dict[str, str], Ledger]]:
    key = _tenant_key(postgres_url)
    app = create_app(
        Settings(database_url=postgres_url, broker_url=redis_url, files_dir=tmp_path),
        dispatch=lambda engine, batch_id: None,
    )
    ledger = Ledger(postgres_url)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, {"Authorization": f"Bearer {key}"}, ledger
    finally:
        ledger.accept_connections()
        app.state.engine.dispose()
        ledger.admin.dispose()


def test_a_database_out_of_reach_answers_503_database_unavailable(
    api: tuple[TestClient, dict[str, str], Ledger],
) -> None:
    client, auth, ledger = api
    assert client.get("/v1/batches", headers=auth).status_code == 200
    ledger.refuse_connections()
    for _ in range(2):  # the pooled connection found dead, then no connection to be had
        answer = client.get("/v1/batches", headers=auth)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "database_unavailable"
        assert answer.json()["error"]["type"] == "server_error"
        assert int(answer.headers["retry-after"]) >= 1


def test_a_keyed_post_the_database_refused_is_not_kept_and_runs_when_retried(
    api: tuple[TestClient, dict[str, str], Ledger],
) -> None:
    client, auth, ledger = api
    keyed = {**auth, "Idempotency-Key": "upload-1"}
    upload = {"file": ("in.jsonl", b'{"custom_id": "a", "prompt": "hi"}\n')}
    ledger.refuse_connections()
    refused = client.post("/v1/files", headers=keyed, files=upload, data={"purpose": "batch"})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "database_unavailable"
    ledger.accept_connections()
    retried = client.post("/v1/files", headers=keyed, files=upload, data={"purpose": "batch"})
    assert retried.status_code == 200, retried.text
    assert "idempotent-replayed" not in retried.headers


@pytest.fixture
def api_with_lock_timeout(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    key = _tenant_key(postgres_url)
    app = create_app(
        Settings(
            database_url=postgres_url, broker_url=redis_url, files_dir=tmp_path, api_lock_timeout_seconds=1
        ),
        dispatch=lambda engine, batch_id: None,
    )
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, {"Authorization": f"Bearer {key}"}
    finally:
        app.state.engine.dispose()


def test_a_table_locked_by_an_operator_answers_503_within_the_lock_timeout(
    api_with_lock_timeout: tuple[TestClient, dict[str, str]], postgres_url: str
) -> None:
    """An operator's ``LOCK TABLE`` (a migration, ``VACUUM FULL``, a ``CREATE INDEX`` without
    ``CONCURRENTLY``): each request that needs the table held an API thread until the lock went,
    minutes perhaps, and with the threads all taken every route of every tenant waited. A lock
    waited for longer than ``TOKENMILL_API_LOCK_TIMEOUT_SECONDS`` answers 503 instead."""
    client, auth = api_with_lock_timeout
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    upload = {"file": ("in.jsonl", json.dumps(line).encode() + b"\n")}
    file_id = client.post("/v1/files", headers=auth, files=upload, data={"purpose": "batch"}).json()["id"]
    create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    operator = sa.create_engine(normalize_url(postgres_url), poolclass=sa.NullPool)
    held = operator.connect()
    held.execute(sa.text("LOCK TABLE requests IN ACCESS EXCLUSIVE MODE"))
    # The operator lets go after a while: the old API answered then, long after the 1 s bound.
    letting_go = threading.Timer(10, held.rollback)
    letting_go.start()
    try:
        started = time.monotonic()
        answer = client.post("/v1/batches", headers=auth, json=create)
        waited = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "database_unavailable"
        assert waited < 5
    finally:
        letting_go.cancel()
        held.rollback()
        held.close()
        operator.dispose()
    # Once the lock is gone, the same create goes through, and it is the only batch.
    assert client.post("/v1/batches", headers=auth, json=create).status_code == 200
    assert len(client.get("/v1/batches", headers=auth).json()["data"]) == 1


def test_a_batch_validated_after_its_answer_waits_out_a_table_lock(
    postgres_url: str, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch read after the create answered (``validating``) whose writes met an operator's
    lock past the API's lock timeout was failed for good (``internal_error``: the input file
    could not be read), its producer's requests lost to a wait of seconds. It waits the lock out,
    then is queued."""
    store.upgrade_to_head(postgres_url)
    engine = store.make_engine(postgres_url)
    tenant = store.create_tenant(engine, "t")
    auth = {"Authorization": f"Bearer {create_api_key(engine, tenant.id)}"}
    engine.dispose()
    settings = Settings(
        database_url=postgres_url,
        broker_url=redis_url,
        files_dir=tmp_path,
        api_lock_timeout_seconds=0.2,
        background_ingest_bytes=0,  # every batch is read after its create answers
    )
    app = create_app(settings, dispatch=lambda engine, batch_id: None)
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    upload = {"file": ("in.jsonl", json.dumps(line).encode() + b"\n")}
    operator = sa.create_engine(normalize_url(postgres_url), poolclass=sa.NullPool)
    held = operator.connect()
    answers: list[dict[str, object]] = []
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            uploaded = client.post("/v1/files", headers=auth, files=upload, data={"purpose": "batch"})
            create = {
                "input_file_id": uploaded.json()["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            }
            held.execute(sa.text("LOCK TABLE requests IN ACCESS EXCLUSIVE MODE"))
            # The test client returns once the background validation is over.
            creating = threading.Thread(
                target=lambda: answers.append(client.post("/v1/batches", headers=auth, json=create).json())
            )
            creating.start()
            deadline = time.monotonic() + 30

            def waited() -> bool:
                return any("waits for the database" in record.message for record in caplog.records)

            while creating.is_alive() and not waited():
                assert time.monotonic() < deadline, "the validation neither failed nor waited"
                creating.join(0.05)
            held.rollback()  # the operator lets go
            creating.join(60)
            assert not creating.is_alive()
            [created] = answers
            assert created["status"] == "validating"
            batch = client.get(f"/v1/batches/{created['id']}", headers=auth).json()
            assert batch["status"] == "in_progress", batch
            assert batch["request_counts"]["total"] == 1
    finally:
        held.rollback()
        held.close()
        operator.dispose()
        app.state.engine.dispose()


def _api_session_settings(app_database_url: str, redis_url: str, tmp_path: Path) -> dict[str, str]:
    app = create_app(
        Settings(
            database_url=app_database_url,
            broker_url=redis_url,
            files_dir=tmp_path,
            api_lock_timeout_seconds=3,
        ),
        dispatch=lambda engine, batch_id: None,
    )
    try:
        with app.state.engine.connect() as conn:
            return {
                name: conn.execute(sa.text(f"SHOW {name}")).scalar_one()
                for name in ("lock_timeout", "statement_timeout")
            }
    finally:
        app.state.engine.dispose()


def test_the_lock_timeout_keeps_the_options_the_url_gives(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    store.upgrade_to_head(postgres_url)
    given = sa.make_url(postgres_url).update_query_dict({"options": "-c statement_timeout=12345"})
    shown = _api_session_settings(given.render_as_string(hide_password=False), redis_url, tmp_path)
    assert shown == {"lock_timeout": "3s", "statement_timeout": "12345ms"}


def test_the_lock_timeout_keeps_the_options_pgoptions_gives(
    postgres_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq reads ``PGOPTIONS`` only for a connection given no ``options`` of its own: the lock
    timeout's replaced an operator's (a ``search_path``, a ``statement_timeout``) in the API
    alone, whose workers kept them."""
    store.upgrade_to_head(postgres_url)
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=12345")
    shown = _api_session_settings(postgres_url, redis_url, tmp_path)
    assert shown == {"lock_timeout": "3s", "statement_timeout": "12345ms"}


def test_a_call_neither_sent_nor_cancelled_is_answered_bound_to_it(postgres_url: str, tmp_path: Path) -> None:
    """A chat call whose send to the broker failed is cancelled before its 503, so that a retry
    pays for nothing. When the ledger is out of reach too (one network cut for both), the cancel
    fails and the call stays queued in the ledger, for the sweeper to send: its answer was an
    unbound 503, the Idempotency-Key freed and the SDK's retry submitted (and paid for) a second
    call. It is bound to the call now, and says not to retry."""
    store.upgrade_to_head(postgres_url)
    engine = store.make_engine(postgres_url)
    tenant = store.create_tenant(engine, "t")
    auth = {"Authorization": f"Bearer {create_api_key(engine, tenant.id)}"}
    engine.dispose()
    dead_broker = f"redis://127.0.0.1:{services.free_port()}/0"
    app = create_app(
        Settings(database_url=postgres_url, broker_url=dead_broker, files_dir=tmp_path),
        dispatch=lambda engine, batch_id: None,
    )
    ledger = Ledger(postgres_url)
    cut: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # The cancel's first read: the ledger goes out of reach just then.
        if not cut and statement.startswith("SELECT batches.status"):
            cut.append(statement)
            ledger.refuse_connections()

    event.listen(app.state.engine, "before_cursor_execute", before)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            answer = client.post(
                "/v1/chat/completions",
                headers={**auth, "Idempotency-Key": "cut-1"},
                json={"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert cut, "the call was never cancelled"
            assert answer.status_code == 503, answer.text
            assert answer.headers.get("tokenmill-bound-to"), answer.headers
            assert answer.headers["x-should-retry"] == "false"
    finally:
        ledger.accept_connections()
        app.state.engine.dispose()
        ledger.admin.dispose()
