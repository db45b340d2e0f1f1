"""Ingest: stream a JSONL upload, validate every line, and write a batch and its requests.

Two line forms are accepted:

- OpenAI's batch line ``{"custom_id", "method": "POST", "url", "body"}``; ``url`` must be the
  batch's endpoint.
- The short form ``{"custom_id"?, "prompt" | "messages", "model"?, ...params}``: the body is the
  submit-time ``defaults`` overlaid with the line's params; ``prompt`` becomes one user message
  (for agent runs, the ``input``). Without ``custom_id`` the line gets ``line-<number>``.

Every bad line is reported (line number, code, message, param). Unless ``skip_invalid``, one bad
line rejects the whole batch, as OpenAI does: the batch row is written with status ``failed`` and its
errors, and no request rows. With ``skip_invalid`` the good lines run and the batch keeps the errors
of the bad ones. A batch stores the first ``max_errors`` (100) errors and counts them all
(``error_count``); an error message quotes at most 200 characters of any input value.

Memory does not grow with the file nor with its lines: the file is read line by line (a line over
``max_body_bytes`` is skipped in pieces, never held), each accepted body is kept only as its JSON
text, and rows are sent in chunks of at most ``chunk_size`` rows and ``chunk_bytes`` bytes inside
one transaction, so a rejected batch leaves nothing behind. Duplicate detection keeps 12 bytes per
custom_id (a keyed 64-bit hash and the line number), not the ids themselves.

:func:`ingest_batch` writes the batch row with its requests. For a file read after the create call
answered: :func:`prepare_batch` (checks), :func:`open_batch` (the row, ``validating``), then
:func:`fill_batch`; a batch cancelled or expired meanwhile stops the reading and gets no request.

The tenant's quotas (``store.quotas``) are enforced in the same transaction, once the rows are
written and before they commit: over one, a batch written with its requests raises
``QuotaExceeded`` and leaves nothing behind; an opened one (``validating``) ends ``failed`` with
the quota's code as its error (``queued_requests_quota_exceeded``, ``queued_tokens_quota_exceeded``,
``daily_budget_exceeded``), no request queued.

Line error codes: ``invalid_json``, ``invalid_line`` (JSON but not an object), ``missing_field``,
``wrong_type``, ``invalid_value``, ``duplicate_custom_id``, ``unknown_endpoint``,
``mismatched_endpoint``, ``invalid_method``, ``body_too_large``, ``too_many_lines``, ``empty_file``
(line None), and those of :mod:`store.input_checks` for what the ledger cannot keep or a worker
could not run: ``non_finite_number`` (NaN, Infinity, 1e999), ``nesting_too_deep`` (over 64 levels),
``lone_surrogate`` and ``nul_character`` (in any string or key); and those of the caller's
``check_body`` (the API's for agent runs: ``unknown_tool``, ``invalid_agent_run``). A batch left
``validating`` by an API that died (its lease, ``validating_until``, not renewed) is failed by
:func:`fail_abandoned_validations` with ``validation_interrupted``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from store.batch_lifecycle import move_batches
from store.clock import now_seconds
from store.engine import driver_error, is_postgresql, write_transaction
from store.errors import InvalidArgument, InvalidState, QuotaExceeded
from store.ids import new_id
from store.input_checks import JSONRejected, bounded_text, check_json_value, parse_json, quote_input
from store.quotas import enforce_tenant_quotas, estimate_prompt_tokens
from store.request_kinds import REQUEST_KINDS, BadLine, RequestKindSpec, require_field
from store.tables import (
    MAX_CUSTOM_ID_CHARS,
    Batch,
    BatchStatus,
    Request,
    RequestKind,
    RequestStatus,
    Tenant,
)

__all__ = [
    "MAX_STORED_ERRORS",
    "BatchSpec",
    "ExtraBodyCheck",
    "IngestReport",
    "LineError",
    "extend_validation",
    "fail_abandoned_validations",
    "fail_batch",
    "fill_batch",
    "ingest_batch",
    "open_batch",
    "parse_completion_window",
    "prepare_batch",
]

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
# Errors kept on a batch (all are counted): what a producer needs to fix a file, and a batch
# object that stays small however bad the file.
MAX_STORED_ERRORS = 100
MAX_ERROR_MESSAGE_CHARS = 500
_WINDOW = re.compile(r"^([1-9][0-9]*)h$")
_SHORT_FORM_KEYS = ("custom_id", "prompt", "messages")

# A check of a line's body that the ledger cannot make itself (e.g. that an agent run's tools
# exist: ``store`` knows no tools); raises ``InvalidArgument`` whose ``code`` becomes the line's
# error code and whose ``param`` is a path inside the body.
ExtraBodyCheck = Callable[[Mapping[str, Any]], None]


@dataclass(frozen=True, slots=True)
class LineError:
    """One validation failure; ``line`` is 1-based (None for a file-level error)."""

    line: int | None
    code: str
    message: str
    param: str | None = None

    def __post_init__(self) -> None:
        # Bounded and storable whatever the line held (messages quote input, params name its keys).
        object.__setattr__(self, "message", bounded_text(self.message, MAX_ERROR_MESSAGE_CHARS))
        if self.param is not None:
            object.__setattr__(self, "param", bounded_text(self.param))

    def to_openai(self) -> dict[str, Any]:
        """The ``errors.data[]`` item of an OpenAI batch object."""
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True)
class IngestReport:
    """What ingest did. ``status`` is ``in_progress`` (requests written) or ``failed`` (nothing
    written; ``errors`` say why). ``invalid_lines`` counts every bad line; ``errors`` keeps the
    first ``max_errors`` of them."""

    batch_id: str
    status: BatchStatus
    lines: int
    accepted: int
    invalid_lines: int
    errors: list[LineError] = field(default_factory=list)

    @property
    def rejected(self) -> bool:
        return self.status == BatchStatus.FAILED


def parse_completion_window(window: str) -> int:
    """Seconds in a completion window such as ``"24h"``."""
    match = _WINDOW.match(window)
    if match is None:
        raise InvalidArgument(f"completion_window must look like '24h', got {window!r}", "completion_window")
    return int(match.group(1)) * 3600


def _check_storable(value: Any, prefix: str) -> None:
    """A batch-level value (defaults, metadata) goes through the same checks as a line."""
    try:
        check_json_value(value, prefix=prefix)
    except JSONRejected as e:
        param = e.param or prefix.rstrip(".") or None
        raise InvalidArgument(f"{param}: {e.message}" if param else e.message, param, code=e.code) from e


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    _check_storable(dict(metadata), "metadata.")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidArgument(f"metadata has {len(metadata)} pairs, at most {MAX_METADATA_PAIRS}", "metadata")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument("metadata keys and values must be strings", "metadata")
        if len(key) > MAX_METADATA_KEY_CHARS or len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidArgument(
                f"metadata keys are at most {MAX_METADATA_KEY_CHARS} characters and values "
                f"{MAX_METADATA_VALUE_CHARS}",
                "metadata",
            )
    return dict(metadata)


def _read_lines(source: IO[bytes], max_body_bytes: int) -> Iterator[bytes | None]:
    """Physical lines without their ending; None for a line longer than ``max_body_bytes`` (read
    and dropped in pieces, so one huge line never sits in memory)."""
    limit = max_body_bytes + 2  # room for "\r\n"
    while True:
        raw = source.readline(limit)
        if not raw:
            return
        if not raw.endswith(b"\n") and len(raw) >= limit:
            while True:
                rest = source.readline(limit)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
            continue
        line = raw.rstrip(b"\r\n")
        yield None if len(line) > max_body_bytes else line


def _checked(check_body: ExtraBodyCheck | None, body: Mapping[str, Any], prefix: str) -> None:
    if check_body is None:
        return
    try:
        check_body(body)
    except InvalidArgument as e:
        param = None if e.param is None else prefix + e.param
        raise BadLine(e.code or "invalid_value", str(e), param) from e


def _parse_line(
    raw: bytes,
    line_number: int,
    request_kind: RequestKindSpec,
    defaults: Mapping[str, Any],
    check_body: ExtraBodyCheck | None = None,
) -> tuple[str, dict[str, Any]]:
    """(custom_id, body) of a valid line; raises BadLine."""
    try:
        obj = parse_json(raw)
    except JSONRejected as e:
        raise BadLine(e.code, e.message, e.param) from e
    if not isinstance(obj, dict):
        raise BadLine("invalid_line", "line must be a JSON object")
    if "body" in obj or "url" in obj or "method" in obj:
        custom_id = require_field(obj, "custom_id", str, "a string")
        method = require_field(obj, "method", str, "a string")
        if method.upper() != "POST":
            raise BadLine("invalid_method", f"method must be POST, got {quote_input(method)}", "method")
        url = require_field(obj, "url", str, "a string")
        if url not in REQUEST_KINDS:
            raise BadLine("unknown_endpoint", f"unknown endpoint {quote_input(url)}", "url")
        if url != request_kind.endpoint:
            raise BadLine(
                "mismatched_endpoint",
                f"url {quote_input(url)} differs from the batch endpoint {request_kind.endpoint!r}",
                "url",
            )
        body = require_field(obj, "body", dict, "an object")
        request_kind.check_body(body, "body.")
        _checked(check_body, body, "body.")
    else:
        custom_id = obj.pop("custom_id", None)
        if custom_id is None:
            custom_id = f"line-{line_number}"
        elif not isinstance(custom_id, str):
            raise BadLine("wrong_type", "'custom_id' must be a string", "custom_id")
        prompt = obj.pop("prompt", None)
        body = {**defaults, **obj}
        request_kind.take_prompt(body, prompt, obj)
        request_kind.check_body(body, "")
        _checked(check_body, body, "")
    if not custom_id:
        raise BadLine("invalid_value", "'custom_id' must not be empty", "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise BadLine(
            "invalid_value", f"'custom_id' is longer than {MAX_CUSTOM_ID_CHARS} characters", "custom_id"
        )
    return custom_id, body


class _Rejected(Exception):
    """Raised inside the ingest transaction to roll it back."""


class _Stopped(Exception):
    """Raised inside the ingest transaction of a batch that stopped while validating."""


def _status(conn: Connection, batch_id: str) -> BatchStatus:
    return BatchStatus(conn.execute(sa.select(Batch.status).where(Batch.id == batch_id)).scalar_one())


def ingest_batch(
    engine: Engine,
    source: IO[bytes],
    *,
    tenant_id: str,
    endpoint: str = "/v1/chat/completions",
    completion_window: str = "24h",
    metadata: Mapping[str, str] | None = None,
    input_file_id: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    skip_invalid: bool = False,
    max_body_bytes: int = 1024 * 1024,
    max_lines: int | None = None,
    max_errors: int = MAX_STORED_ERRORS,
    priority: int = 0,
    webhook_url: str | None = None,
    hidden: bool = False,
    chunk_size: int = 5000,
    chunk_bytes: int = 4 * 1024 * 1024,
    postgres_copy: bool = True,
    now: int | None = None,
    check_body: ExtraBodyCheck | None = None,
) -> IngestReport:
    """Read ``source`` (a binary file object, read line by line) into a new batch.

    ``defaults`` fill the short form's body (e.g. ``{"model": "gpt-4o-mini", "temperature": 0}``).
    ``skip_invalid`` writes the good lines and reports the bad ones instead of rejecting the batch
    (a batch with no good line is still rejected). Raises ``InvalidArgument`` for a bad endpoint,
    completion window, metadata or defaults (nothing written). Rows are sent to the database
    every ``chunk_size`` rows or ``chunk_bytes`` bytes of bodies, whichever comes first.
    ``postgres_copy=False`` inserts with multi-row INSERT instead of COPY on PostgreSQL (for
    comparison in ``bench/ingest.py``). The same as :func:`prepare_batch` then :func:`fill_batch`
    (without :func:`open_batch`: the batch row is written with its requests, in one transaction).
    """
    spec = prepare_batch(
        tenant_id=tenant_id,
        endpoint=endpoint,
        completion_window=completion_window,
        metadata=metadata,
        input_file_id=input_file_id,
        defaults=defaults,
        priority=priority,
        webhook_url=webhook_url,
        hidden=hidden,
        now=now,
    )
    return fill_batch(
        engine,
        spec,
        source,
        skip_invalid=skip_invalid,
        max_body_bytes=max_body_bytes,
        max_lines=max_lines,
        max_errors=max_errors,
        chunk_size=chunk_size,
        chunk_bytes=chunk_bytes,
        postgres_copy=postgres_copy,
        check_body=check_body,
    )


@dataclass(frozen=True)
class BatchSpec:
    """A new batch's checked batch-level values (from :func:`prepare_batch`); ``row`` is its
    batch row, status ``validating``."""

    row: Mapping[str, Any]
    kind: RequestKind
    defaults: Mapping[str, Any]
    opened: bool = False  # the row is in the database already (open_batch)

    @property
    def batch_id(self) -> str:
        batch_id: str = self.row["id"]
        return batch_id


def prepare_batch(
    *,
    tenant_id: str,
    endpoint: str = "/v1/chat/completions",
    completion_window: str = "24h",
    metadata: Mapping[str, str] | None = None,
    input_file_id: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    priority: int = 0,
    webhook_url: str | None = None,
    hidden: bool = False,
    now: int | None = None,
) -> BatchSpec:
    """Check a new batch's own values (raises ``InvalidArgument``); writes nothing."""
    request_kind = REQUEST_KINDS.get(endpoint)
    if request_kind is None:
        raise InvalidArgument(f"unknown endpoint {endpoint!r}; known: {sorted(REQUEST_KINDS)}", "endpoint")
    kind = request_kind.kind
    window_seconds = parse_completion_window(completion_window)
    batch_metadata = _check_metadata(metadata)
    checked_defaults = dict(defaults or {})
    _check_storable(checked_defaults, "")
    created_at = now if now is not None else now_seconds()
    row: dict[str, Any] = {
        "id": new_id("batch_"),
        "tenant_id": tenant_id,
        "endpoint": endpoint,
        "kind": kind,
        "completion_window": completion_window,
        "input_file_id": input_file_id,
        "status": BatchStatus.VALIDATING,
        "metadata": batch_metadata,  # the column key (the ORM attribute is batch_metadata)
        "priority": priority,
        "webhook_url": webhook_url,
        "hidden": hidden,
        "total_count": 0,
        "completed_count": 0,
        "failed_count": 0,
        "cancelled_count": 0,
        "created_at": created_at,
        "expires_at": created_at + window_seconds,
    }
    return BatchSpec(row, kind, checked_defaults)


def open_batch(
    engine: Engine, spec: BatchSpec, *, lease_seconds: int | None = None, max_validating: int | None = None
) -> BatchSpec:
    """Write the batch row, status ``validating``, before its lines are read (a large file is
    read after the create call answered). Returns the spec to pass to :func:`fill_batch`. With
    ``lease_seconds`` the caller holds the batch that long and renews it
    (:func:`extend_validation`); unrenewed, :func:`fail_abandoned_validations` ends it. Raises
    ``InvalidState`` when the tenant has ``max_validating`` batches validating already."""
    row = dict(spec.row)
    if lease_seconds is not None:
        row["validating_until"] = now_seconds() + lease_seconds
    with write_transaction(engine) as conn:
        if max_validating is not None:
            # The tenant's row locked: concurrent opens of one tenant count one after the other
            # (NO KEY UPDATE: the foreign-key checks of the tenant's other inserts do not wait).
            tenant_id = row["tenant_id"]
            conn.execute(sa.select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))
            validating = conn.execute(
                sa.select(sa.func.count()).where(
                    Batch.tenant_id == tenant_id, Batch.status == BatchStatus.VALIDATING
                )
            ).scalar_one()
            if validating >= max_validating:
                raise InvalidState(f"{validating} batches of the tenant are validating already")
        conn.execute(sa.insert(Batch), row)
    return BatchSpec(spec.row, spec.kind, spec.defaults, opened=True)


def extend_validation(engine: Engine, batch_ids: Sequence[str], lease_seconds: int) -> int:
    """Renew the leases of those of ``batch_ids`` still validating; returns how many."""
    with write_transaction(engine) as conn:
        renewed = conn.execute(
            sa.update(Batch)
            .where(Batch.id.in_(batch_ids), Batch.status == BatchStatus.VALIDATING)
            .values(validating_until=now_seconds() + lease_seconds)
        )
    return int(renewed.rowcount)


VALIDATION_INTERRUPTED = "validation_interrupted"


def fail_abandoned_validations(engine: Engine, now: int | None = None) -> list[str]:
    """Fail the batches validating under a lease that ran out: the API process reading the file
    died (its transaction rolled back, so no request of theirs exists). Failed rather than read
    again: the file may be what killed it, and a new batch from the same file costs the tenant one
    call. Returns their ids."""
    now = now if now is not None else now_seconds()
    error = LineError(
        None,
        VALIDATION_INTERRUPTED,
        "the server validating the input file stopped before it finished; nothing of this batch "
        "was queued or billed: create the batch again",
    )
    with write_transaction(engine) as conn:
        failed = conn.execute(
            sa.update(Batch)
            .where(
                Batch.status == BatchStatus.VALIDATING,
                Batch.validating_until.is_not(None),
                Batch.validating_until < now,
            )
            .values(status=BatchStatus.FAILED, failed_at=now, errors=[error.to_openai()], error_count=1)
            .returning(Batch.id)
        ).scalars()
        return sorted(failed)


def fail_batch(engine: Engine, batch_id: str, code: str, message: str) -> bool:
    """End a batch still ``validating`` as ``failed`` with one file-level error (its file could
    not be read); False if it is no longer validating."""
    error = LineError(None, code, message)
    with write_transaction(engine) as conn:
        ended = _end_validation(conn, batch_id, BatchStatus.FAILED, now_seconds(), [error], 1)
    return ended


def _end_validation(
    conn: Connection,
    batch_id: str,
    target: BatchStatus,
    now: int,
    errors: list[LineError],
    error_count: int,
    **values: Any,
) -> bool:
    """Move a batch still ``validating`` to ``target`` (``in_progress`` or ``failed``) with its line
    errors; False when it is no longer validating (cancelled or expired meanwhile)."""
    moved = move_batches(
        conn,
        target,
        now,
        Batch.id == batch_id,  # only a validating batch may become in_progress or failed
        errors=[error.to_openai() for error in errors] or None,
        error_count=error_count,
        **values,
    )
    return bool(moved)


def fill_batch(
    engine: Engine,
    spec: BatchSpec,
    source: IO[bytes],
    *,
    skip_invalid: bool = False,
    max_body_bytes: int = 1024 * 1024,
    max_lines: int | None = None,
    max_errors: int = MAX_STORED_ERRORS,
    chunk_size: int = 5000,
    chunk_bytes: int = 4 * 1024 * 1024,
    postgres_copy: bool = True,
    check_body: ExtraBodyCheck | None = None,
) -> IngestReport:
    """Validate ``source``'s lines and write them as the requests of the batch of ``spec``; the
    batch becomes ``in_progress``, or ``failed`` with its errors (parameters as in
    :func:`ingest_batch`; ``check_body`` checks each valid line's body further). An opened batch
    cancelled or expired meanwhile gets no request: the report then has its status."""
    batch_row = dict(spec.row)
    batch_id, kind, defaults = spec.batch_id, spec.kind, spec.defaults
    request_kind = REQUEST_KINDS[batch_row["endpoint"]]
    created_at: int = batch_row["created_at"]
    tenant_id: str = batch_row["tenant_id"]
    priority: int = batch_row["priority"]
    errors: list[LineError] = []
    invalid = 0
    accepted = 0
    prompt_tokens = 0
    lines = 0

    def bad(line: int | None, code: str, message: str, param: str | None = None) -> None:
        nonlocal invalid
        invalid += 1
        if len(errors) < max_errors:
            errors.append(LineError(line, code, message, param))

    try:
        with write_transaction(engine) as conn:
            if not spec.opened:
                conn.execute(sa.insert(Batch), batch_row)
            seen = _CustomIdLines()
            request_ids = _request_ids()
            chunk: list[_NewRequest] = []
            chunk_body_bytes = 0
            common = _RequestCommon(batch_id, tenant_id, kind, priority, created_at)
            encode_body = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

            def insert(rows: list[_NewRequest]) -> None:
                _insert_requests(conn, common, rows, postgres_copy)
                if spec.opened and _status(conn, batch_id) != BatchStatus.VALIDATING:
                    raise _Stopped  # cancelled or expired meanwhile: stop reading the file

            for line_number, raw in enumerate(_read_lines(source, max_body_bytes), start=1):
                if raw is not None and not raw.strip():
                    continue  # blank lines (a trailing newline) are not requests
                lines += 1
                if max_lines is not None and lines > max_lines:
                    bad(line_number, "too_many_lines", f"a batch holds at most {max_lines} requests")
                    skip_invalid = False  # a file over the limit is rejected whole
                    break
                if raw is None:
                    bad(line_number, "body_too_large", f"line is larger than {max_body_bytes} bytes")
                    continue
                try:
                    custom_id, body = _parse_line(raw, line_number, request_kind, defaults, check_body)
                except BadLine as e:
                    bad(line_number, e.code, str(e), e.param)
                    continue
                first = seen.first_line(custom_id, line_number)
                if first != line_number:
                    bad(
                        line_number,
                        "duplicate_custom_id",
                        f"custom_id {quote_input(custom_id)} is already used on line {first}",
                        "custom_id",
                    )
                    continue
                if invalid and not skip_invalid:
                    continue  # rejected already: keep validating, stop writing
                accepted += 1
                # Only the body's JSON text is kept until the chunk is sent: a parsed body can be
                # many times the size of its line.
                body_text = encode_body(body)
                del body
                prompt_tokens += estimate_prompt_tokens(body_text)
                chunk.append((next(request_ids), custom_id, line_number, body_text))
                chunk_body_bytes += len(body_text)
                if len(chunk) >= chunk_size or chunk_body_bytes >= chunk_bytes:
                    insert(chunk)
                    chunk, chunk_body_bytes = [], 0
            if lines == 0:
                bad(None, "empty_file", "the file holds no requests")
            if (invalid and not skip_invalid) or accepted == 0:
                raise _Rejected
            insert(chunk)
            # Last, with the rows written: over a quota, they roll back and nothing is queued.
            enforce_tenant_quotas(
                conn, tenant_id, new_requests=accepted, new_tokens=prompt_tokens, exclude_batch_id=batch_id
            )
            # The skipped lines' errors stay on the batch, as a rejected batch's do.
            started_at = now_seconds() if spec.opened else created_at
            if not _end_validation(
                conn,
                batch_id,
                BatchStatus.IN_PROGRESS,
                started_at,
                errors,
                invalid,
                total_count=accepted,
                prompt_tokens_estimate=prompt_tokens,
            ):
                raise _Stopped  # cancelled or expired while validating: roll the requests back
    except _Rejected:
        with write_transaction(engine) as conn:
            if not spec.opened:
                conn.execute(sa.insert(Batch), batch_row)  # rolled back with its requests: again
            failed_at = now_seconds() if spec.opened else created_at
            _end_validation(conn, batch_id, BatchStatus.FAILED, failed_at, errors, invalid)
        return IngestReport(batch_id, BatchStatus.FAILED, lines, 0, invalid, errors)
    except _Stopped:
        with engine.connect() as conn:
            status = _status(conn, batch_id)
        return IngestReport(batch_id, status, lines, 0, invalid, errors)
    except QuotaExceeded as e:
        if not spec.opened:
            raise  # nothing was written: the caller refuses the create
        # Answered ``validating`` already: the batch fails with the quota's code, nothing queued.
        quota_error = LineError(None, e.code, str(e))
        with write_transaction(engine) as conn:
            _end_validation(conn, batch_id, BatchStatus.FAILED, now_seconds(), [quota_error], 1)
        return IngestReport(batch_id, BatchStatus.FAILED, lines, 0, invalid, [quota_error])
    return IngestReport(batch_id, BatchStatus.IN_PROGRESS, lines, accepted, invalid, errors)


class _CustomIdLines:
    """custom_id -> the line it was first used on, in 12 bytes an id: an open-addressing table
    of keyed 64-bit hashes (8 bytes) and line numbers (4 bytes). A dict of the ids themselves
    held up to 512 characters a line, over 100 MB for a million lines. Two distinct ids share a
    hash with odds about n^2 / 2^65 (3e-8 for a million lines); the key is drawn per batch, so a
    producer cannot build such a pair on purpose."""

    _INITIAL_SLOTS = 1024

    def __init__(self) -> None:
        self._key = os.urandom(16)
        self._hashes = array("Q", bytes(8 * self._INITIAL_SLOTS))  # 0 marks a free slot
        self._lines = array("I", bytes(4 * self._INITIAL_SLOTS))
        self._used = 0

    def first_line(self, custom_id: str, line_number: int) -> int:
        """The line ``custom_id`` was first seen on, recording it at ``line_number`` if new."""
        digest = hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=8, key=self._key)
        hashed = int.from_bytes(digest.digest(), "little") or 1
        slot = self._find(hashed)
        if self._hashes[slot] == hashed:
            return self._lines[slot]
        self._hashes[slot] = hashed
        self._lines[slot] = line_number
        self._used += 1
        if self._used * 4 > len(self._hashes) * 3:
            self._grow()
        return line_number

    def _find(self, hashed: int) -> int:
        """The slot holding ``hashed``, or the free slot where it goes (linear probing)."""
        hashes = self._hashes
        mask = len(hashes) - 1
        slot = hashed & mask
        while hashes[slot] != 0 and hashes[slot] != hashed:
            slot = (slot + 1) & mask
        return slot

    def _grow(self) -> None:
        old_hashes, old_lines = self._hashes, self._lines
        size = 2 * len(old_hashes)
        self._hashes = array("Q", bytes(8 * size))
        self._lines = array("I", bytes(4 * size))
        for hashed, line_number in zip(old_hashes, old_lines, strict=True):
            if hashed:
                slot = self._find(hashed)
                self._hashes[slot] = hashed
                self._lines[slot] = line_number


def _request_ids() -> Iterator[str]:
    """``batch_req_<32 hex>`` ids, drawing randomness 4096 ids at a time (one ``uuid4`` per line
    was a tenth of ingest time)."""
    while True:
        pool = os.urandom(16 * 4096).hex()
        for start in range(0, len(pool), 32):
            yield "batch_req_" + pool[start : start + 32]


@dataclass(frozen=True, slots=True)
class _RequestCommon:
    """Columns every request of a batch shares."""

    batch_id: str
    tenant_id: str
    kind: RequestKind
    priority: int
    created_at: int


# (id, custom_id, line_number, body as JSON text) of one accepted line.
_NewRequest = tuple[str, str, int, str]


def _insert_requests(
    conn: Connection, common: _RequestCommon, rows: list[_NewRequest], postgres_copy: bool
) -> None:
    if not rows:
        return
    if postgres_copy and is_postgresql(conn):
        _copy_requests(conn, common, rows)
        return
    conn.execute(
        sa.insert(Request),
        [
            {
                "id": request_id,
                "batch_id": common.batch_id,
                "tenant_id": common.tenant_id,
                "custom_id": custom_id,
                "line_number": line_number,
                "kind": common.kind,
                "body": json.loads(body_text),
                "status": RequestStatus.QUEUED,
                "priority": common.priority,
                "attempts": 0,
                "created_at": common.created_at,
            }
            for request_id, custom_id, line_number, body_text in rows
        ],
    )


_COPY_TEXT_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: str) -> str:
    """A value escaped for COPY's text format."""
    return value.translate(_COPY_TEXT_ESCAPES)


def _copy_json(text: str) -> str:
    # JSON text holds no raw tab or newline (json escapes them): only backslashes need doubling.
    return text.replace("\\", "\\\\")


def _copy_requests(conn: Connection, common: _RequestCommon, rows: list[_NewRequest]) -> None:
    """COPY rows into ``requests``, formatting the text rows here: psycopg's per-row
    ``write_row`` cost more than the server's work (bench/ingest.py compares with INSERT)."""
    driver_connection = conn.connection.driver_connection
    assert driver_connection is not None
    # Constant columns first, so each line is one f-string of the varying ones.
    columns = (
        "batch_id, tenant_id, kind, status, priority, attempts, created_at, id, custom_id, line_number, body"
    )
    prefix = "\t".join(
        (
            _copy_text(common.batch_id),
            _copy_text(common.tenant_id),
            common.kind.value,
            RequestStatus.QUEUED.value,
            str(common.priority),
            "0",
            str(common.created_at),
        )
    )
    text = "".join(
        f"{prefix}\t{request_id}\t{_copy_text(custom_id)}\t{line_number}\t{_copy_json(body_text)}\n"
        for request_id, custom_id, line_number, body_text in rows
    )
    try:
        with (
            driver_connection.cursor() as cursor,
            cursor.copy(f"COPY requests ({columns}) FROM STDIN") as copy,
        ):
            copy.write(text.encode())
    except psycopg.Error as error:
        # Past SQLAlchemy, so its handling done here (a connection left read-only by a failover
        # is lost too); the transaction's own connection goes with the pool's.
        raised = driver_error(conn.engine, error, conn.connection, "COPY requests", None)
        if raised.connection_invalidated:
            conn.invalidate(error)
        raise raised from error
