"""What a single call costs the ledger in round trips, and what it keeps: its row and its claim
commit without waiting for the disk (the caller hears of neither before the durable commit of
its result, which flushes them too), a streamed call's claim waits for it, and a pooled
connection used a moment ago goes to work without a ping (PostgreSQL)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

import store
from store.engine import autocommit_connection
from store.interactive import interactive_outcome, lease_lapsed, submit_interactive

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
NO_FLUSH_WAIT = "set_config('synchronous_commit', 'off', true)"


class Statements:
    """The SQL statements ``engine`` sends, as the server receives them."""

    def __init__(self, engine: Engine) -> None:
        self.sent: list[str] = []
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, _conn: object, _cursor: object, statement: str, *_: object) -> None:
        self.sent.append(" ".join(statement.split()))

    def take(self) -> list[str]:
        sent, self.sent = self.sent, []
        return sent


def test_a_single_calls_row_and_plain_claim_do_not_wait_for_the_disk_its_result_does(
    pg_engine: Engine,
) -> None:
    tenant = store.create_tenant(pg_engine, "acme")
    statements = Statements(pg_engine)
    submitted = submit_interactive(pg_engine, tenant.id, dict(CHAT), endpoint="/v1/chat/completions")
    # Both rows, the commit told not to wait, and the tenant's quotas read: one statement.
    (submit,) = statements.take()
    assert NO_FLUSH_WAIT in submit
    claimed = store.claim_requests(pg_engine, [submitted.request_id], "lane", 60, durable=False)
    assert [request.id for request in claimed] == [submitted.request_id]
    # One statement, its own transaction, set from within not to wait.
    (claim,) = statements.take()
    assert NO_FLUSH_WAIT in claim
    # Visible to every session at once ("ledger first" is about what others see).
    with pg_engine.connect() as other:
        status = other.execute(
            sa.select(store.Request.status).where(store.Request.id == submitted.request_id)
        ).scalar_one()
    assert status == store.RequestStatus.RUNNING
    store.record_results(
        pg_engine,
        [store.ResultRecord(submitted.request_id, store.RequestStatus.SUCCEEDED, {"ok": True}, 200)],
    )
    assert not any("synchronous_commit" in sent for sent in statements.take())


def test_a_claim_waits_for_the_disk_unless_told_otherwise(pg_engine: Engine) -> None:
    """Chunks' claims, and a streamed single call's (its first chunk reaches the caller before
    any result: this commit makes its row durable first)."""
    tenant = store.create_tenant(pg_engine, "acme")
    submitted = submit_interactive(pg_engine, tenant.id, dict(CHAT), endpoint="/v1/chat/completions")
    statements = Statements(pg_engine)
    assert store.claim_requests(pg_engine, [submitted.request_id], "lane", 60)
    assert not any("synchronous_commit" in sent for sent in statements.take())


def test_a_single_calls_result_ends_its_batch_in_three_batch_statements(pg_engine: Engine) -> None:
    """Finalizing says whether the batch is hidden (no look-up for it), and a batch that just
    completed is not looked at again for a cancel: 3 statements on ``batches``, not 5."""
    tenant = store.create_tenant(pg_engine, "acme")
    submitted = submit_interactive(pg_engine, tenant.id, dict(CHAT), endpoint="/v1/chat/completions")
    store.claim_requests(pg_engine, [submitted.request_id], "lane", 60)
    statements = Statements(pg_engine)
    outcome = store.record_results(
        pg_engine,
        [store.ResultRecord(submitted.request_id, store.RequestStatus.SUCCEEDED, {"ok": True}, 200)],
    )
    assert outcome.finalized_batches == [submitted.batch_id]
    on_batches = [sent for sent in statements.take() if "batches" in sent.split(" WHERE")[0]]
    assert len(on_batches) == 3, on_batches  # its counters, -> finalizing, -> completed
    batch = store.get_batch(pg_engine, submitted.batch_id)
    assert batch is not None
    assert batch.status == store.BatchStatus.COMPLETED
    assert (batch.output_file_id, batch.error_file_id) == (None, None)


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(postgres_url: str, pid: int) -> None:
    killer = store.make_engine(postgres_url)
    try:
        with killer.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
            # Gone once the server says so, not after a sleep.
            while conn.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            ).scalar_one():
                conn.rollback()
    finally:
        killer.dispose()


def test_a_connection_used_a_moment_ago_is_not_pinged_and_a_dead_one_renews_the_pool(
    postgres_url: str,
) -> None:
    engine = store.make_engine(postgres_url, idle_ping_seconds=3600)
    try:
        pid = _backend_pid(engine)
        _terminate(postgres_url, pid)
        # No ping: the statement meets the killed backend (a ping at every checkout, one more
        # round trip per transaction, would have replaced it unseen).
        with pytest.raises(sa.exc.DBAPIError) as failure, engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        assert failure.value.connection_invalidated
        assert _backend_pid(engine) != pid
    finally:
        engine.dispose()


def test_a_connection_idle_past_the_threshold_is_pinged_and_replaced_if_dead(postgres_url: str) -> None:
    engine = store.make_engine(postgres_url, idle_ping_seconds=0)
    try:
        pid = _backend_pid(engine)
        _terminate(postgres_url, pid)
        assert _backend_pid(engine) != pid  # no error: the ping found it dead
    finally:
        engine.dispose()


def test_the_connection_handed_back_last_is_the_next_one_out(postgres_url: str) -> None:
    """Between bursts one warm connection serves: a first-in-first-out pool walked every
    connection a burst opened, each idle long enough to be pinged before its next use."""
    engine = store.make_engine(postgres_url)
    try:
        burst = [engine.connect() for _ in range(4)]
        pids = [conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() for conn in burst]
        for conn in burst:
            conn.close()
        assert [_backend_pid(engine) for _ in range(3)] == [pids[-1]] * 3
    finally:
        engine.dispose()


def test_the_reads_made_while_calls_run_keep_the_connections_prepared_statements(postgres_url: str) -> None:
    """psycopg drops every statement it prepared on a connection when that connection rolls back,
    and a pooled read's end is a rollback unless it ran in autocommit. The lane reads its calls'
    batches' statuses every half second while any runs: each such read made the next claims and
    results on that connection parsed and planned again (and sent a ``DEALLOCATE ALL``)."""
    store.upgrade_to_head(postgres_url)
    engine = store.make_engine(postgres_url, pool_size=1, max_overflow=0)
    try:
        tenant = store.create_tenant(engine, "acme")
        submitted = submit_interactive(engine, tenant.id, dict(CHAT), endpoint="/v1/chat/completions")
        prepared = sa.text("SELECT count(*) FROM pg_prepared_statements")
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            for _ in range(6):  # psycopg prepares a statement at its sixth run on a connection
                conn.execute(prepared)
            assert conn.execute(prepared).scalar_one() >= 1
        reads = {
            "batch_statuses": lambda: store.batch_statuses(engine, [submitted.batch_id]),
            "interactive_outcome": lambda: interactive_outcome(engine, submitted.request_id),
            "lease_lapsed": lambda: lease_lapsed(engine, submitted.request_id),
        }
        for name, read in reads.items():
            read()
            with autocommit_connection(engine) as conn:
                assert conn.execute(prepared).scalar_one() >= 1, f"{name} dropped them"
    finally:
        engine.dispose()


def test_the_single_call_result_statement_stays_short_enough_for_psycopg_to_keep_its_conversion() -> None:
    """psycopg converts a statement's ``%(name)s`` placeholders once and keeps the conversion only
    for statements of at most 4,096 characters; a longer one is converted again at every call (a
    about 4% of the lane's CPU went to it at 16 concurrent calls, py-spy)."""
    from psycopg._queries import MAX_CACHED_STATEMENT_LENGTH
    from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect

    from store.results import _SINGLE_CALL_RESULT

    compiled = str(_SINGLE_CALL_RESULT.compile(dialect=psycopg_dialect.dialect()))
    assert len(compiled.encode()) <= MAX_CACHED_STATEMENT_LENGTH
