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
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.batch_lifecycle import batch_file_ids
from store.batches import EXPIRED_ERROR
from store.tables import Request, RequestStatus, Result

__all__ = ["batch_file_ids", "in_chunks", "iter_error_lines", "iter_output_lines"]

# Lines per page read; a page is at most this many result bodies in memory.
PAGE_LINES = 1000
CHUNK_BYTES = 64 * 1024
_EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


def _columns() -> list[sa.ColumnElement[Any]]:
    return [
        Request.id.expression,
        Request.custom_id.expression,
        Result.status_code.expression,
        Result.upstream_request_id.expression,
        sa.cast(Result.response_body, sa.Text).label("body_text"),
        Result.error_code.expression,
        Result.error_message.expression,
    ]


def _response(status_code: int | None, request_id: str, body_text: str | None) -> str:
    if status_code is None:
        return "null"
    body = body_text if body_text is not None else "null"
    return f'{{"status_code":{status_code},"request_id":{json.dumps(request_id)},"body":{body}}}'


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


def iter_output_lines(engine: Engine, batch_id: str) -> Iterator[bytes]:
    """The output file: one line per succeeded request, each ending in ``\\n``."""
    query = (
        sa.select(*_columns(), Request.line_number)
        .join(Result, Result.request_id == Request.id)
        .where(Request.batch_id == batch_id, Result.status == RequestStatus.SUCCEEDED)
        .order_by(Request.line_number)
    )
    for row in _pages(engine, query):
        response = _response(row.status_code or 200, row.upstream_request_id or row.id, row.body_text)
        yield (
            f'{{"id":{json.dumps(row.id)},"custom_id":{json.dumps(row.custom_id)},'
            f'"response":{response},"error":null}}\n'
        ).encode()


def iter_error_lines(engine: Engine, batch_id: str) -> Iterator[bytes]:
    """The error file: failed requests, and requests an expired batch never ran."""
    query = (
        sa.select(*_columns(), Request.status.label("request_status"), Request.line_number)
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
    for row in _pages(engine, query):
        if row.error_code is None and row.request_status == RequestStatus.CANCELLED:
            code, message, response = EXPIRED_ERROR, _EXPIRED_MESSAGE, "null"
        else:
            code = row.error_code or "request_failed"
            message = row.error_message or ""
            response = _response(row.status_code, row.upstream_request_id or row.id, row.body_text)
        error = json.dumps({"code": code, "message": message}, separators=(",", ":"))
        yield (
            f'{{"id":{json.dumps(row.id)},"custom_id":{json.dumps(row.custom_id)},'
            f'"response":{response},"error":{error}}}\n'
        ).encode()


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
