"""A batch's output and error files, generated from the results as OpenAI-format JSONL.

Output line: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}``.
Error line: ``{"id", "custom_id", "response": {...} | null, "error": {"code", "message"}}`` for
failed requests, and for requests an expired batch never ran (code ``batch_expired``). Lines come
in input line order, streamed from the database (never the whole batch in memory). The response
body is passed through as the text the database holds, not parsed and re-serialized.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.batch_lifecycle import batch_file_ids
from store.batches import EXPIRED_ERROR
from store.tables import Request, RequestStatus, Result

__all__ = ["batch_file_ids", "iter_error_lines", "iter_output_lines"]

_YIELD_PER = 1000
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


def iter_output_lines(engine: Engine, batch_id: str) -> Iterator[bytes]:
    """The output file: one line per succeeded request, each ending in ``\\n``."""
    query = (
        sa.select(*_columns())
        .join(Result, Result.request_id == Request.id)
        .where(Request.batch_id == batch_id, Result.status == RequestStatus.SUCCEEDED)
        .order_by(Request.line_number)
    )
    with engine.connect() as conn:
        for row in conn.execution_options(yield_per=_YIELD_PER).execute(query):
            response = _response(row.status_code or 200, row.upstream_request_id or row.id, row.body_text)
            yield (
                f'{{"id":{json.dumps(row.id)},"custom_id":{json.dumps(row.custom_id)},'
                f'"response":{response},"error":null}}\n'
            ).encode()


def iter_error_lines(engine: Engine, batch_id: str) -> Iterator[bytes]:
    """The error file: failed requests, and requests an expired batch never ran."""
    query = (
        sa.select(*_columns(), Request.status.label("request_status"))
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
    with engine.connect() as conn:
        for row in conn.execution_options(yield_per=_YIELD_PER).execute(query):
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
