"""Writing a chunk's results to the ledger: ``ResultWriter`` buffers them and writes them in batches
off the event loop; ``record_isolating_bad_rows`` writes a batch so that a row the database refuses
fails alone (as ``UNRECORDABLE``) rather than keep the whole batch out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from store import PaidAnswer, RecordOutcome, RequestStatus, ResultRecord, record_results
from store.engine import again_if_disconnected
from store.input_checks import bounded_text
from store.log_redaction import redacted_error_text
from store.results import UNRECORDABLE, record_single_call_result
from telemetry import tracing
from telemetry.metrics import RecordedRequest, observe_recorded

if TYPE_CHECKING:
    from workers.runner import ChunkReport

__all__ = ["UNRECORDABLE", "ResultWriter", "record_isolating_bad_rows", "record_single_call"]

_logger = logging.getLogger(__name__)

_ERROR_TEXT_LIMIT = 500
_COLUMN_LIMIT = 200  # the ledger's model and provider-id columns


def _error_text(error: BaseException) -> str:
    """The database's own words for the request's error file, without the statement and parameters
    SQLAlchemy adds (they would echo the row), on one line and bounded. Not for logs: the words may
    quote the row (``redacted_error_text`` is the logs' version)."""
    cause = error.orig if isinstance(error, sa_exc.DBAPIError) and error.orig is not None else error
    text = "".join(ch if ch.isprintable() else " " for ch in f"{type(cause).__name__}: {cause}").strip()
    return bounded_text(text, _ERROR_TEXT_LIMIT - 3)


def _storable(text: str | None) -> str | None:
    """``text`` as the ledger's short text columns hold it (no NUL, at most 200 characters)."""
    return None if text is None else bounded_text(text, _COLUMN_LIMIT - 3)


def _unrecordable(record: ResultRecord, error: BaseException, *, with_spend: bool = True) -> ResultRecord:
    """The failure that stands for a ``record`` the database refused. ``with_spend``: it keeps what
    the provider charged (usage, model, its answers' ids), made storable: the answer was paid
    either way."""
    failure = ResultRecord(
        request_id=record.request_id,
        status=RequestStatus.FAILED,
        error_code=UNRECORDABLE,
        error_message=f"the result could not be recorded: {_error_text(error)}",
        attempts=record.attempts,
        latency_ms=record.latency_ms,
    )
    if not with_spend:
        return failure
    return dataclasses.replace(
        failure,
        upstream_request_id=_storable(record.upstream_request_id),
        model=_storable(record.model),
        usage=record.usage,
        cached=record.cached,
        paid_answers=tuple(
            PaidAnswer(_storable(answer.upstream_request_id), _storable(answer.model), answer.usage)
            for answer in record.paid_answers
        ),
    )


def _unreachable(error: BaseException) -> bool:
    """The database could not be asked at all: writing rows one by one would not help."""
    return isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError) or (
        isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated
    )


def record_single_call(engine: Engine, record: ResultRecord) -> tuple[RecordOutcome, list[str]]:
    """``record_isolating_bad_rows`` for one single call's record (the interactive lane's), in
    one statement when it applies (``store.results.record_single_call_result``); whatever that
    statement leaves to it (a duplicate, a cancelled request, a row the database refuses) goes
    the general way, which decides as it always did.

    A write whose connection died under it goes once more (``store.engine.again_if_disconnected``):
    a call answered within a second wrote on the connection its claim used, unpinged, and its
    paid answer went back in line to be paid for again. The first writer wins, so a write that
    did commit before its connection died makes the second a duplicate."""
    return again_if_disconnected(_record_single_call, engine, record)


def _record_single_call(engine: Engine, record: ResultRecord) -> tuple[RecordOutcome, list[str]]:
    try:
        outcome = record_single_call_result(engine, record)
    except Exception as error:
        if _unreachable(error):
            raise
        outcome = None  # the general way isolates what the database refuses
    if outcome is not None:
        return outcome, []
    return record_isolating_bad_rows(engine, [record])


def record_isolating_bad_rows(
    engine: Engine, records: Sequence[ResultRecord]
) -> tuple[RecordOutcome, list[str]]:
    """``record_results`` for many; when that fails for the data (not the connection), row by row,
    so that a row the database refuses fails alone: its request is recorded as failed with the
    database's error (``UNRECORDABLE``), the others as they are. Returns the outcome and the ids
    recorded so instead. Raises when the database cannot be reached, or refuses even the failure."""
    try:
        return record_results(engine, records), []
    except Exception as error:
        if _unreachable(error):
            raise
        batch_error = error
    inserted: list[str] = []
    duplicates: list[str] = []
    skipped: list[str] = []
    finalized: list[str] = []
    discarded: list[str] = []
    costs: dict[str, Decimal] = {}
    replaced: list[str] = []
    for record in records:
        try:
            outcome = record_results(engine, [record])
        except Exception as error:
            if _unreachable(error):
                raise
            _logger.error(
                "the result of request %s could not be recorded (%s); it fails alone",
                record.request_id,
                redacted_error_text(error),
            )
            try:
                outcome = record_results(engine, [_unrecordable(record, error)])
            except Exception as spend_error:
                if _unreachable(spend_error):
                    raise
                # The spend itself is what the database refuses (usage past its integers): the
                # request still ends, unbilled, rather than block every write after it.
                _logger.error(
                    "the spend of request %s could not be recorded either (%s); it is not billed",
                    record.request_id,
                    redacted_error_text(spend_error),
                )
                outcome = record_results(engine, [_unrecordable(record, error, with_spend=False)])
            replaced.append(record.request_id)
        inserted += outcome.inserted
        duplicates += outcome.duplicates
        skipped += outcome.skipped
        finalized += outcome.finalized_batches
        discarded += outcome.discarded
        costs.update(outcome.costs)
    if not replaced:  # row by row, every one went in: the batch's failure was something else
        _logger.warning(
            "a batched result write failed, then each row went in: %s", redacted_error_text(batch_error)
        )
    return RecordOutcome(inserted, duplicates, skipped, finalized, discarded, costs), replaced


class ResultWriter:
    """Buffers records and writes them with ``record_isolating_bad_rows`` in batches, off the
    event loop. A write that fails (the database out of reach) keeps its records for the next
    flush and is logged; the last flush raises it."""

    def __init__(self, engine: Engine, report: ChunkReport, flush_size: int, flush_interval: float) -> None:
        self._engine = engine
        self._report = report
        self._flush_size = flush_size
        self._flush_interval = flush_interval
        self._buffer: list[ResultRecord] = []
        self._requests: dict[str, RecordedRequest | None] = {}  # for the metrics, by request id
        self._spans: dict[str, Any] = {}  # tracing on: each request's span, linked from its flush
        self._writing: list[ResultRecord] = []  # taken from the buffer, not yet committed
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._stopped = False

    def add(self, record: ResultRecord, request: RecordedRequest | None = None) -> None:
        self._buffer.append(record)
        self._requests[record.request_id] = request
        span = tracing.current_span_context()  # added from the request's task: its span
        if span is not None:
            self._spans[record.request_id] = span
        if len(self._buffer) >= self._flush_size:
            self._wake.set()

    def unwritten_ids(self) -> list[str]:
        """The requests whose result is not written yet: their leases must be kept meanwhile (a
        stalled write must not let another worker adopt and pay for them again). Safe from any
        thread: each list is copied whole (in C, under the GIL)."""
        return [record.request_id for record in [*list(self._writing), *list(self._buffer)]]

    async def flush(self) -> None:
        async with self._lock:
            records, self._buffer = self._buffer, []
            if not records:
                return
            self._writing = records
            # One flush carries many requests: one span, a child of the chunk's, linked to each
            # request's (telemetry.tracing).
            links = [self._spans[r.request_id] for r in records if r.request_id in self._spans]
            try:
                with tracing.span(
                    "tokenmill ledger write", {"tokenmill.ledger.records": len(records)}, links=links
                ):
                    outcome, replaced = await asyncio.to_thread(
                        record_isolating_bad_rows, self._engine, records
                    )
            except BaseException:
                self._buffer[:0] = records  # not written: kept for the next try
                raise
            finally:
                self._writing = []
        # Counted once committed, from what the ledger kept (a duplicate counts nothing); the
        # ledger keeps the first record of a request written twice in one flush.
        requests = {record.request_id: self._requests.pop(record.request_id, None) for record in records}
        for record in records:
            self._spans.pop(record.request_id, None)
        by_id: dict[str, ResultRecord] = {}
        for record in records:
            by_id.setdefault(record.request_id, record)
        observe_recorded(
            [(by_id[request_id], requests[request_id]) for request_id in outcome.inserted],
            outcome.costs,
            replaced=set(replaced),
        )
        self._report.duplicates += len(outcome.duplicates)
        self._report.finalized_batches.extend(outcome.finalized_batches)
        for request_id in replaced:
            if by_id[request_id].status is RequestStatus.SUCCEEDED:
                self._report.succeeded -= 1
                self._report.failed += 1

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    async def run(self) -> None:
        # Stopped by a flag, not by cancellation: on 3.11 ``wait_for`` can swallow a cancel that
        # lands as its timeout fires, and the loop would then never end.
        while not self._stopped:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._flush_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                _logger.exception("writing %d result(s) failed; trying again", len(self._buffer))
