"""Ingest and result-write throughput of the ledger (run by hand; prints figures).

    .venv/bin/python -m bench.ingest [--lines 200000] [--database-url URL]

Without ``--database-url`` it uses a scratch PostgreSQL database (created and dropped through
``tests.services``). Prints, for a JSONL file of ``--lines`` OpenAI batch lines: lines per second
with COPY (what ingest uses on PostgreSQL) against multi-row INSERT as the baseline, the process's
peak RSS, and result writes per second with ``record_results`` in chunks against one-by-one writes.
Targets (issue 3): >= 20,000 lines/s, peak RSS < 300 MB, >= 5,000 result writes/s.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import Engine

import store
from models.types import RequestUsage


def write_jsonl(path: Path, lines: int) -> int:
    with path.open("w") as out:
        for i in range(lines):
            line = {
                "custom_id": f"request-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "gpt-4o-mini",
                    "messages": [
                        {"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": f"Summarize document number {i} in one sentence."},
                    ],
                    "max_tokens": 100,
                },
            }
            out.write(json.dumps(line) + "\n")
    return path.stat().st_size


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def time_ingest(engine: Engine, tenant_id: str, path: Path, postgres_copy: bool) -> tuple[str, float]:
    started = time.perf_counter()
    with path.open("rb") as source:
        report = store.ingest_batch(engine, source, tenant_id=tenant_id, postgres_copy=postgres_copy)
    elapsed = time.perf_counter() - started
    if report.rejected:
        raise SystemExit(f"ingest rejected the file: {report.errors[:3]}")
    return report.batch_id, report.accepted / elapsed


def time_results(engine: Engine, batch_id: str, count: int, chunk: int) -> float:
    ids = store.pending_request_ids(engine, batch_id, limit=count)
    for offset in range(0, len(ids), 1000):
        store.claim_requests(engine, ids[offset : offset + 1000], "bench", 3600)
    usage = RequestUsage(prompt_tokens=30, completion_tokens=20)
    body = {"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"message": {"content": "ok"}}]}
    records = [
        store.ResultRecord(i, store.RequestStatus.SUCCEEDED, body, model="gpt-4o-mini", usage=usage)
        for i in ids
    ]
    started = time.perf_counter()
    for offset in range(0, len(records), chunk):
        store.record_results(engine, records[offset : offset + chunk])
    return len(records) / (time.perf_counter() - started)


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    # tests.services knows how to find or start a PostgreSQL server; imported by name so this
    # script's type check does not take in the test suite.
    services = importlib.import_module("tests.services")
    with services.fresh_postgres_database() as scratch:
        yield str(scratch)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--result-chunk", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, database(args.database_url) as url:
        path = Path(tmp) / "batch.jsonl"
        size = write_jsonl(path, args.lines)
        print(
            f"input: {args.lines:,} lines, {size / 1e6:.1f} MB; peak RSS before ingest {peak_rss_mb():.0f} MB"
        )
        store.upgrade_to_head(url)
        engine = store.make_engine(url)
        try:
            tenant = store.create_tenant(engine, "bench")
            dialect = engine.dialect.name
            baseline_rate = None
            if dialect == "postgresql":
                _, baseline_rate = time_ingest(engine, tenant.id, path, postgres_copy=False)
                print(f"ingest, multi-row INSERT (baseline): {baseline_rate:,.0f} lines/s")
            batch_id, rate = time_ingest(engine, tenant.id, path, postgres_copy=True)
            label = "COPY" if dialect == "postgresql" else "INSERT"
            ratio = f" ({rate / baseline_rate:.1f}x baseline)" if baseline_rate else ""
            print(f"ingest, {label} ({dialect}): {rate:,.0f} lines/s{ratio}; target >= 20,000")
            print(f"peak RSS after ingest: {peak_rss_mb():.0f} MB; target < 300 MB")
            single = time_results(engine, batch_id, 2_000, chunk=1)
            print(f"result writes, one per call (baseline): {single:,.0f}/s")
            chunked = time_results(engine, batch_id, 50_000, chunk=args.result_chunk)
            print(
                f"result writes, {args.result_chunk} per call: {chunked:,.0f}/s "
                f"({chunked / single:.1f}x baseline); target >= 5,000"
            )
        finally:
            engine.dispose()


if __name__ == "__main__":
    main()
