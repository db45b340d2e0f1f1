"""What measuring a batch output file's size costs (``store.export.with_bytes``), against reading
its content, for one ended batch of ``--lines`` lines on PostgreSQL.

    .venv/bin/python -m bench.result_file_bytes [--lines 1000000]

Builds a scratch database at the schema's head, fills one completed batch (its requests, their
results: answers of about 700 bytes, 2% failed) with ``INSERT ... SELECT generate_series``,
VACUUM ANALYZEs it, then times: the size measured (``store.export.file_bytes``: each line's
length, each body's read as ``octet_length``), the content read as a download reads it
(``iter_output_lines``), and ``files.retrieve``'s ``with_bytes`` the first time (measured and kept)
and the second (kept: one row). Checks that the measured size is the content's. URL of the server
from TOKENMILL_BENCH_PG_URL (as bench.throughput).
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa

import store
from bench.query_plans import PG_ADMIN_URL
from store.export import file_bytes

_ANSWER = """json_build_object('id', 'chatcmpl-' || g, 'object', 'chat.completion',
    'created', 1764633600,
    'model', 'gpt-4o-mini-2024-07-18', 'choices', json_build_array(json_build_object('index', 0,
      'message', json_build_object('role', 'assistant',
        'content', 'answer ' || g || ' ' || repeat('word ', 80),
        'refusal', null), 'logprobs', null, 'finish_reason', 'stop')),
    'usage', json_build_object('prompt_tokens', 12, 'completion_tokens', 30, 'total_tokens', 42),
    'system_fingerprint', 'fp_f7f3f8f6fb')"""


def fill(engine: sa.Engine, lines: int) -> tuple[str, str]:
    """One completed batch of ``lines`` lines; returns its (batch id, output file id)."""
    batch_id = "batch_bytes"
    output_id, error_id = store.batch_file_ids(batch_id)
    now = int(time.time())
    with engine.begin() as conn:
        conn.execute(sa.text("SET session_replication_role = replica"))
        conn.execute(
            sa.text("INSERT INTO tenants (id, name, created_at) VALUES ('t', 't', :now)"), {"now": now}
        )
        conn.execute(
            sa.text(
                "INSERT INTO batches (id, tenant_id, endpoint, kind, completion_window, status, "
                "error_count, priority, hidden, webhook_attempts, total_count, completed_count, "
                "failed_count, cancelled_count, created_at, expires_at, in_progress_at, "
                "finalizing_at, completed_at, output_file_id, error_file_id) VALUES (:id, 't', "
                "'/v1/chat/completions', 'chat_completion', '24h', 'completed', 0, 0, false, 0, :n, "
                ":n - :n / 50, :n / 50, 0, :now, :now + 86400, :now, :now, :now, :out, :err)"
            ),
            {"id": batch_id, "n": lines, "now": now, "out": output_id, "err": error_id},
        )
        conn.execute(
            sa.text(
                "INSERT INTO files (id, tenant_id, filename, purpose, bytes, created_at, status, kind, "
                "storage_path, batch_id) VALUES (:out, 't', 'out.jsonl', 'batch_output', NULL, :now, "
                "'processed', 'batch_output', NULL, :id), (:err, 't', 'err.jsonl', 'batch_output', NULL, "
                ":now, 'processed', 'batch_error', NULL, :id)"
            ),
            {"id": batch_id, "now": now, "out": output_id, "err": error_id},
        )
        conn.execute(
            sa.text(
                "INSERT INTO requests (id, batch_id, tenant_id, custom_id, line_number, kind, body, "
                "status, priority, attempts, handed_back_attempts, created_at, finished_at) "
                "SELECT 'batch_req_' || md5(g::text), :id, 't', 'line-' || g, g, 'chat_completion', "
                "'{}', CASE WHEN g % 50 = 7 THEN 'failed' ELSE 'succeeded' END, 0, 1, 0, :now, :now "
                "FROM generate_series(0, :n - 1) g"
            ),
            {"id": batch_id, "n": lines, "now": now},
        )
        conn.execute(
            sa.text(
                "INSERT INTO results (request_id, batch_id, tenant_id, status, status_code, "
                "response_body, upstream_request_id, error_code, error_message, finish_reason, model, "
                "prompt_tokens, completion_tokens, cached_prompt_tokens, reasoning_tokens, cached, "
                "cost_usd, latency_ms, attempts, created_at) "
                "SELECT 'batch_req_' || md5(g::text), :id, 't', "
                "CASE WHEN g % 50 = 7 THEN 'failed' ELSE 'succeeded' END, "
                f"CASE WHEN g % 50 = 7 THEN 400 ELSE 200 END, {_ANSWER}, 'req_' || md5(g::text), "
                "CASE WHEN g % 50 = 7 THEN 'invalid_request' END, CASE WHEN g % 50 = 7 THEN 'refused' END, "
                "'stop', 'gpt-4o-mini', 12, 30, 0, 0, false, 0.0000198, 120.0, 1, :now "
                "FROM generate_series(0, :n - 1) g"
            ),
            {"id": batch_id, "n": lines, "now": now},
        )
        conn.execute(sa.text("SET session_replication_role = DEFAULT"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE"))
    return batch_id, output_id


T = TypeVar("T")


def timed(what: str, call: Callable[[], T]) -> T:
    started = time.perf_counter()
    value = call()
    print(f"{what:<52} {time.perf_counter() - started:8.2f} s")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"tm_bytes_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = store.make_engine(sa.make_url(PG_ADMIN_URL).set(database=name))
    try:
        store.upgrade_to_head(engine)
        batch_id, output_id = timed(f"fill {args.lines:,} lines", lambda: fill(engine, args.lines))
        measured = timed(
            "measure (file_bytes)", lambda: file_bytes(engine, batch_id, store.FileKind.BATCH_OUTPUT)
        )
        content = timed(
            "read the content (iter_output_lines)",
            lambda: sum(len(line) for line in store.iter_output_lines(engine, batch_id)),
        )
        assert measured == content, (measured, content)
        print(f"output file: {content:,} bytes")

        def retrieve() -> int | None:
            file = store.get_file(engine, output_id)
            assert file is not None
            [sized] = store.with_bytes(engine, [file])
            return sized.bytes

        first = timed("files.retrieve's with_bytes, first (measure, keep)", retrieve)
        again = timed("files.retrieve's with_bytes, again (kept)", retrieve)
        assert first == again == content
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
