"""The cancel of a large batch (``store.cancel_batch``) while its running requests record results,
before and after the chunked cancel, in one run.

    .venv/bin/python -m bench.cancel [--lines 200000] [--running 64] [--variants before,after]

For each variant: a scratch database at the schema's head, a batch of ``--lines`` lines ingested
as the API does, ``--running`` of them claimed by a worker (live leases), the rest queued. Then
the batch is cancelled while a thread writes those running requests' results one per
``record_results`` call, one every 20 ms, as results come in. Prints the cancel's wall
time, the longest a result write took while the cancel ran (the time it waited for the cancel's
locks), how many result writes committed meanwhile, and the after/before ratios.

``before`` is the cancel as it was (one transaction: every unfinished request locked, its id
shipped to Python, then the batch moved and the requests updated ``= ANY(ids)``); ``after`` is
``store.cancel_batch`` as it is now (``store.batches.STOP_CHUNK_LINES`` lines per transaction);
``api`` is the same bounded as the API's cancel route bounds it (its time is the time to answer;
the sweep ends the rest, not timed here).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

import store
from api.routes.batches import CANCEL_CHUNKS_IN_REQUEST
from bench.ingest import write_jsonl
from bench.throughput import scratch_database
from models.types import RequestUsage
from store.batch_lifecycle import finalize_batches, may_move_to, move_batches
from store.batches import _cancel_unfinished, _lock_unfinished
from store.clock import now_seconds
from store.engine import write_transaction
from store.tables import Batch, BatchStatus, RequestStatus

LEASE_SECONDS = 3_600  # the running requests' leases outlive the run: the cancel leaves them
WRITE_EVERY_SECONDS = 0.02


def cancel_batch_before(engine: Engine, batch_id: str) -> None:
    """``store.cancel_batch`` before the chunks (the baseline): one transaction."""
    now = now_seconds()
    with write_transaction(engine) as conn:
        movable = conn.execute(
            sa.select(may_move_to(BatchStatus.CANCELLING)).where(Batch.id == batch_id)
        ).scalar_one()
        locked = _lock_unfinished(conn, [batch_id], now, sa.true()) if movable else None
        if movable and move_batches(conn, BatchStatus.CANCELLING, now, Batch.id == batch_id):
            _cancel_unfinished(conn, [batch_id], now, among=locked)
            finalize_batches(conn, [batch_id], now)


def cancel_batch_after(engine: Engine, batch_id: str) -> None:
    store.cancel_batch(engine, batch_id)


def cancel_batch_as_the_api(engine: Engine, batch_id: str) -> None:
    """The cancel as POST /v1/batches/{id}/cancel runs it: bounded, the sweep ends the rest."""
    store.cancel_batch(engine, batch_id, max_chunks=CANCEL_CHUNKS_IN_REQUEST)


VARIANTS = {"before": cancel_batch_before, "after": cancel_batch_after, "api": cancel_batch_as_the_api}


@dataclass
class Measure:
    lines: int
    cancel_s: float
    longest_write_s: float
    writes_during_cancel: int
    cancelled: int
    status: str


def _result(request_id: str) -> store.ResultRecord:
    return store.ResultRecord(
        request_id,
        RequestStatus.SUCCEEDED,
        response_body={"object": "chat.completion"},
        upstream_request_id=f"chatcmpl-{request_id}",
        model="gpt-4o-mini",
        usage=RequestUsage(prompt_tokens=10, completion_tokens=5),
    )


def measure(variant: str, path: Path, lines: int, running: int) -> Measure:
    with scratch_database() as url:
        store.upgrade_to_head(url)
        engine = store.make_engine(url)
        try:
            tenant = store.create_tenant(engine, "bench")
            with path.open("rb") as source:
                batch_id = store.ingest_batch(engine, source, tenant_id=tenant.id).batch_id
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sa.text("VACUUM ANALYZE requests"))
            first = store.pending_request_ids(engine, batch_id, running)
            claimed = store.claim_requests(engine, first, "bench-worker", LEASE_SECONDS)
            to_write = [request.id for request in claimed]
            cancel_done = threading.Event()
            longest = [0.0]
            written = [0]

            def write_results() -> None:
                for request_id in to_write:
                    started = time.perf_counter()
                    store.record_results(engine, [_result(request_id)])
                    longest[0] = max(longest[0], time.perf_counter() - started)
                    if cancel_done.is_set():
                        return
                    written[0] += 1
                    # Paced, as results come in: the writes span the whole cancel.
                    cancel_done.wait(WRITE_EVERY_SECONDS)

            writer = threading.Thread(target=write_results, name="results")
            started = time.perf_counter()
            writer.start()
            VARIANTS[variant](engine, batch_id)
            cancel_s = time.perf_counter() - started
            cancel_done.set()
            writer.join()
            batch = store.get_batch(engine, batch_id)
            assert batch is not None
            return Measure(lines, cancel_s, longest[0], written[0], batch.cancelled_count, str(batch.status))
        finally:
            engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--running", type=int, default=2_000, help="requests claimed, recording results")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    results: dict[str, Measure] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch.jsonl"
        write_jsonl(path, args.lines)
        for variant in args.variants.split(","):
            results[variant] = found = measure(variant, path, args.lines, args.running)
            print(
                f"{variant:>7}: cancel of {found.lines:,} lines in {found.cancel_s:.2f} s"
                f" ({found.cancelled:,} cancelled, batch {found.status})"
                f" | longest result write meanwhile {found.longest_write_s * 1000:.0f} ms,"
                f" {found.writes_during_cancel} written during the cancel"
                f" | load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    if "before" in results:
        base = results["before"]
        for variant, found in results.items():
            if variant == "before":
                continue
            print(
                f"{variant}/before: cancel time {found.cancel_s / base.cancel_s:.2f}x,"
                f" longest result write {found.longest_write_s / max(base.longest_write_s, 1e-9):.3f}x"
            )


if __name__ == "__main__":
    main()
