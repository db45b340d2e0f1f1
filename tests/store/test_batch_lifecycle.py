"""The batch state machine: every status change a batch goes through, seen by a database trigger
(on both databases), is one that ``store.ALLOWED_TRANSITIONS`` allows; a completed batch passes
through ``finalizing``."""

from __future__ import annotations

import io

import sqlalchemy as sa
from sqlalchemy.engine import Engine

import store
from tests.store.conftest import IngestFn, chat_line, jsonl
from tests.store.test_results import success

S = store.BatchStatus

_SQLITE_TRIGGERS = [
    "CREATE TRIGGER log_batch_insert AFTER INSERT ON batches BEGIN "
    "INSERT INTO batch_status_log (batch_id, old, new) VALUES (new.id, NULL, new.status); END",
    "CREATE TRIGGER log_batch_status AFTER UPDATE OF status ON batches WHEN old.status <> new.status BEGIN "
    "INSERT INTO batch_status_log (batch_id, old, new) VALUES (new.id, old.status, new.status); END",
]
_POSTGRESQL_TRIGGERS = [
    """CREATE FUNCTION log_batch_status() RETURNS trigger AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO batch_status_log (batch_id, old, new) VALUES (NEW.id, NULL, NEW.status::text);
        ELSIF OLD.status IS DISTINCT FROM NEW.status THEN
            INSERT INTO batch_status_log (batch_id, old, new)
                VALUES (NEW.id, OLD.status::text, NEW.status::text);
        END IF;
        RETURN NEW;
    END $$ LANGUAGE plpgsql""",
    "CREATE TRIGGER log_batch_status AFTER INSERT OR UPDATE ON batches "
    "FOR EACH ROW EXECUTE FUNCTION log_batch_status()",
]


def log_status_changes(engine: Engine) -> None:
    with engine.begin() as conn:
        key = "INTEGER PRIMARY KEY AUTOINCREMENT" if engine.dialect.name == "sqlite" else "SERIAL PRIMARY KEY"
        conn.execute(sa.text(f"CREATE TABLE batch_status_log (seq {key}, batch_id TEXT, old TEXT, new TEXT)"))
        for statement in _SQLITE_TRIGGERS if engine.dialect.name == "sqlite" else _POSTGRESQL_TRIGGERS:
            conn.execute(sa.text(statement))


def status_changes(engine: Engine, batch_id: str) -> list[tuple[str | None, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT old, new FROM batch_status_log WHERE batch_id = :id ORDER BY seq"),
            {"id": batch_id},
        ).all()
    return [(row.old, row.new) for row in rows]


def assert_allowed(changes: list[tuple[str | None, str]]) -> None:
    first, *moves = changes
    assert first == (None, S.VALIDATING)
    for old, new in moves:
        assert old is not None
        assert S(new) in store.ALLOWED_TRANSITIONS[S(old)], f"{old} -> {new} is not allowed"


def test_a_completed_batch_passes_through_finalizing(engine: Engine, ingest: IngestFn) -> None:
    log_status_changes(engine)
    batch = ingest(2)
    ids = store.pending_request_ids(engine, batch.batch_id)
    store.record_results(engine, [success(ids[0])], now=5000)
    assert status_changes(engine, batch.batch_id) == [(None, S.VALIDATING), (S.VALIDATING, S.IN_PROGRESS)]
    store.record_results(engine, [success(ids[1])], now=5001)
    assert status_changes(engine, batch.batch_id)[2:] == [
        (S.IN_PROGRESS, S.FINALIZING),
        (S.FINALIZING, S.COMPLETED),
    ]
    got = store.get_batch(engine, batch.batch_id)
    assert got is not None
    assert (got.status, got.finalizing_at, got.completed_at) == (S.COMPLETED, 5001, 5001)


def test_every_path_takes_allowed_transitions_only(
    engine: Engine, ingest: IngestFn, tenant: store.Tenant
) -> None:
    log_status_changes(engine)
    ended: dict[str, store.BatchStatus] = {}

    cancelled = ingest(2).batch_id  # in_progress -> cancelling -> cancelled (nothing running)
    store.cancel_batch(engine, cancelled)
    ended[cancelled] = S.CANCELLED

    running = ingest(2).batch_id  # a request still held: cancelling until it settles
    (claimed, *_) = store.claim_queued(engine, [running], "w1", 60, limit=1)
    store.cancel_batch(engine, running)
    assert store.batch_statuses(engine, [running]) == {running: S.CANCELLING}
    store.cancel_claimed(engine, [claimed.id], "w1")
    ended[running] = S.CANCELLED

    rejected = ingest([chat_line("a"), "not json"]).batch_id  # validating -> failed
    ended[rejected] = S.FAILED

    spec = store.prepare_batch(tenant_id=tenant.id)
    opened = store.open_batch(engine, spec)  # validating, read later
    store.cancel_batch(engine, opened.batch_id)  # validating -> cancelling -> cancelled
    report = store.fill_batch(engine, opened, jsonl([chat_line("a")]))
    assert report.status == S.CANCELLED  # the file is not read into a stopped batch
    ended[opened.batch_id] = S.CANCELLED

    unreadable = store.open_batch(engine, store.prepare_batch(tenant_id=tenant.id))
    assert store.fail_batch(engine, unreadable.batch_id, "file_not_found", "gone")
    ended[unreadable.batch_id] = S.FAILED

    late = store.ingest_batch(
        engine,
        io.BytesIO(b'{"custom_id": "a", "prompt": "hi"}\n'),
        tenant_id=tenant.id,
        defaults={"model": "m"},
    ).batch_id
    got = store.get_batch(engine, late)
    assert got is not None
    assert store.expire_batches(engine, now=got.expires_at) == [late]
    ended[late] = S.EXPIRED

    for batch_id, status in ended.items():
        changes = status_changes(engine, batch_id)
        assert_allowed(changes)
        assert changes[-1][1] == status
        assert status in store.ENDED_STATUSES
        # An ended batch is left as it is: cancelling it, expiring it or failing it moves nothing.
        store.cancel_batch(engine, batch_id)
        store.fail_batch(engine, batch_id, "file_not_found", "gone")
        store.expire_batches(engine, now=10**12)
        assert status_changes(engine, batch_id) == changes


def test_one_ended_set_and_workers_stop_at_it_or_cancelling() -> None:
    assert {S.COMPLETED, S.FAILED, S.CANCELLED, S.EXPIRED} == store.ENDED_STATUSES
    assert store.ENDED_STATUSES | {S.CANCELLING} == store.STOPPED_BATCH_STATUSES
    # Every status but the ended ones leads somewhere, and every status can be reached.
    reachable = {S.VALIDATING} | set().union(*store.ALLOWED_TRANSITIONS.values())
    assert reachable == set(S)
