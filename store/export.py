"""A batch's output and error files, generated from the results as OpenAI-format JSONL.

Output line: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}``.
Error line: ``{"id", "custom_id", "response": {...} | null, "error": {"code", "message"}}`` for
failed requests, and for requests an expired batch never ran (code ``batch_expired``). Lines come
in input line order, read from the database a page at a time (keyset paging on
``(batch_id, line_number)``, each page its own short read: a slow download holds no connection nor
transaction open between pages, and memory is a page, whatever the batch). The response body is
passed through as the text the database holds, not parsed and re-serialized. ``in_chunks`` joins
lines into blocks of about 64 KiB for a streamed HTTP response (one hop to a thread per block, not
per line).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.batch_lifecycle import ENDED_STATUSES, all_finished, batch_file_ids
from store.batches import EXPIRED_ERROR
from store.engine import is_postgresql, write_transaction
from store.tables import Batch, File, FileKind, Request, RequestStatus, Result

__all__ = ["batch_file_ids", "file_bytes", "in_chunks", "iter_error_lines", "iter_output_lines", "with_bytes"]

# Lines per page read; a page is at most this many result bodies in memory.
PAGE_LINES = 1000
CHUNK_BYTES = 64 * 1024
_EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


def _columns(body: sa.ColumnElement[Any]) -> list[sa.ColumnElement[Any]]:
    return [
        Request.id.expression,
        Request.custom_id.expression,
        Result.status_code.expression,
        Result.upstream_request_id.expression,
        body.label("body"),
        Result.error_code.expression,
        Result.error_message.expression,
    ]


# The response body as the database holds it (passed through, not re-serialized).
_BODY_TEXT = sa.cast(Result.response_body, sa.Text)


def _body_bytes(engine: Engine) -> sa.ColumnElement[Any]:
    """The body's length in bytes (UTF-8): what a file's size needs, without reading it out."""
    if is_postgresql(engine):
        return sa.func.octet_length(_BODY_TEXT)
    return sa.func.length(sa.cast(_BODY_TEXT, sa.LargeBinary))  # SQLite: octet_length is 3.43+


class _Line(NamedTuple):
    """A line around its response body: ``head``, the body (when ``has_body``; ``null`` when the
    database holds none), ``tail``."""

    head: str
    has_body: bool
    tail: str


def _line(row: Any, response: tuple[int, str] | None, error: str) -> _Line:
    start = f'{{"id":{json.dumps(row.id)},"custom_id":{json.dumps(row.custom_id)},"response":'
    end = f',"error":{error}}}\n'
    if response is None:
        return _Line(f"{start}null{end}", False, "")
    status_code, request_id = response
    return _Line(
        f'{start}{{"status_code":{status_code},"request_id":{json.dumps(request_id)},"body":',
        True,
        f"}}{end}",
    )


def _output_line(row: Any) -> _Line:
    return _line(row, (row.status_code or 200, row.upstream_request_id or row.id), "null")


def _error_line(row: Any) -> _Line:
    if row.error_code is None and row.request_status == RequestStatus.CANCELLED:
        code, message, response = EXPIRED_ERROR, _EXPIRED_MESSAGE, None
    else:
        code = row.error_code or "request_failed"
        message = row.error_message or ""
        response = None if row.status_code is None else (row.status_code, row.upstream_request_id or row.id)
    return _line(row, response, json.dumps({"code": code, "message": message}, separators=(",", ":")))


def _pages(engine: Engine, query: sa.Select[Any]) -> Iterator[Any]:
    """The rows of ``query`` (ordered by line number) a page at a time, each page one short read."""
    after = -1
    while True:
        with engine.connect() as conn:
            rows = conn.execute(query.where(Request.line_number > after).limit(PAGE_LINES)).all()
        yield from rows
        if len(rows) < PAGE_LINES:
            return
        after = rows[-1].line_number


def _output_query(batch_id: str, body: sa.ColumnElement[Any]) -> sa.Select[Any]:
    return (
        sa.select(*_columns(body), Request.line_number)
        .join(Result, Result.request_id == Request.id)
        .where(Request.batch_id == batch_id, Result.status == RequestStatus.SUCCEEDED)
        .order_by(Request.line_number)
    )


def _error_query(batch_id: str, body: sa.ColumnElement[Any]) -> sa.Select[Any]:
    return (
        sa.select(*_columns(body), Request.status.label("request_status"), Request.line_number)
        .outerjoin(Result, Result.request_id == Request.id)
        .where(
            Request.batch_id == batch_id,
            sa.or_(
                Result.status == RequestStatus.FAILED,
                sa.and_(Request.status == RequestStatus.CANCELLED, Request.last_error == EXPIRED_ERROR),
            ),
        )
        .order_by(Request.line_number)
    )


def _lines(engine: Engine, query: sa.Select[Any], line_of: Callable[[Any], _Line]) -> Iterator[bytes]:
    for row in _pages(engine, query):
        line = line_of(row)
        if line.has_body:
            yield f"{line.head}{row.body if row.body is not None else 'null'}{line.tail}".encode()
        else:
            yield line.head.encode()


def _bytes(engine: Engine, query: sa.Select[Any], line_of: Callable[[Any], _Line]) -> int:
    """What ``_lines`` of the same query adds up to, ``row.body`` being each body's length."""
    total = 0
    for row in _pages(engine, query):
        line = line_of(row)
        total += len(line.head.encode()) + len(line.tail.encode())
        if line.has_body:
            total += row.body if row.body is not None else len("null")
    return total


def iter_output_lines(engine: Engine, batch_id: str) -> Iterator[bytes]:
    """The output file: one line per succeeded request, each ending in ``\\n``."""
    return _lines(engine, _output_query(batch_id, _BODY_TEXT), _output_line)


def iter_error_lines(engine: Engine, batch_id: str) -> Iterator[bytes]:
    """The error file: failed requests, and requests an expired batch never ran."""
    return _lines(engine, _error_query(batch_id, _BODY_TEXT), _error_line)


def _plain(column: sa.ColumnElement[Any] | Any) -> sa.ColumnElement[bool]:
    """``column``'s text is printable ASCII with no quote nor backslash: ``json.dumps`` writes it
    as it is, between two quotes (PostgreSQL only)."""
    return sa.and_(
        column.op("~")("^[ -~]*$"), sa.func.strpos(column, '"') == 0, sa.func.strpos(column, "\\") == 0
    )


class _Template(NamedTuple):
    """An output line's row of empty strings (and the shortest other values)."""

    id: str = ""
    custom_id: str = ""
    status_code: int = 1
    upstream_request_id: str = "x"


# An output line's length but for its strings, status code and body (the template's "1" and "x").
_OUTPUT_LINE_FRAME = len("".join(_output_line(_Template())[::2])) - len("1") - len("x")


def _output_bytes(engine: Engine, batch_id: str) -> int:
    """The output file's size: in SQL for the lines whose every string ``json.dumps`` writes as
    is (the usual line), the line function's for the rest. bench.result_file_bytes, a 2-core
    machine under load 10-15: 100k lines of 950 bytes took 2.6 s a line at a time, 0.5 s this
    way; a million lines (957 MB) 5.6-7.0 s, where reading the content took 81 s."""
    body = _body_bytes(engine)
    if not is_postgresql(engine):
        return _bytes(engine, _output_query(batch_id, body), _output_line)
    plain = sa.and_(
        Result.status_code.is_not(None),
        Result.status_code != 0,
        Result.upstream_request_id.is_not(None),
        Result.upstream_request_id != "",
        body.is_not(None),
        _plain(Request.id),
        _plain(Request.custom_id),
        _plain(Result.upstream_request_id),
    )
    lengths = (
        sa.func.length(Request.id)
        + sa.func.length(Request.custom_id)
        + sa.func.length(Result.upstream_request_id)
        + sa.func.length(sa.cast(Result.status_code, sa.Text))
        + body
        + _OUTPUT_LINE_FRAME
    )
    summed = (
        sa.select(
            sa.func.coalesce(sa.func.sum(lengths).filter(plain), 0).label("plain_bytes"),
            sa.func.count().filter(sa.not_(plain)).label("others"),
        )
        .select_from(Request)
        .join(Result, Result.request_id == Request.id)
        .where(Request.batch_id == batch_id, Result.status == RequestStatus.SUCCEEDED)
    )
    with engine.connect() as conn:
        plain_bytes, others = conn.execute(summed).one()
    if not others:
        return int(plain_bytes)
    return int(plain_bytes) + _bytes(
        engine, _output_query(batch_id, body).where(sa.not_(plain)), _output_line
    )


def file_bytes(engine: Engine, batch_id: str, kind: FileKind) -> int:
    """The size of a batch's output (or error) file as its lines read now, in bytes."""
    if kind == FileKind.BATCH_OUTPUT:
        return _output_bytes(engine, batch_id)
    return _bytes(engine, _error_query(batch_id, _body_bytes(engine)), _error_line)


def in_chunks(lines: Iterable[bytes], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """``lines`` joined into blocks of about ``size`` bytes (a line is never split)."""
    block: list[bytes] = []
    length = 0
    for line in lines:
        block.append(line)
        length += len(line)
        if length >= size:
            yield b"".join(block)
            block, length = [], 0
    if block:
        yield b"".join(block)


def with_bytes(engine: Engine, files: Sequence[File]) -> Sequence[File]:
    """``files``, each batch output / error file's ``bytes`` (None until measured) filled in.

    Measured when first read rather than when its batch ends: a batch ends in the transaction of
    its last result, on a worker's path, and its files may never be looked at. Once every request
    of the batch has finished the content cannot change: the size is kept (one pass over the
    batch's lines, reading each body's length, not the body). Before that (an expired batch
    whose running requests may still answer) it is measured at each read, and not kept."""
    unmeasured = {file.batch_id for file in files if file.bytes is None and file.batch_id is not None}
    if not unmeasured:
        return files
    with engine.connect() as conn:
        final = set(
            conn.execute(
                sa.select(Batch.id).where(
                    Batch.id.in_(sorted(unmeasured)), Batch.status.in_(ENDED_STATUSES), all_finished()
                )
            ).scalars()
        )
    for file in files:
        if file.bytes is not None or file.batch_id is None:
            continue
        file.bytes = file_bytes(engine, file.batch_id, file.kind)
        if file.batch_id in final:
            with write_transaction(engine) as conn:
                conn.execute(
                    sa.update(File).where(File.id == file.id, File.bytes.is_(None)).values(bytes=file.bytes)
                )
    return files
