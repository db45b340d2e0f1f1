"""A string of a request's body that the ledger keeps in a bounded column is checked against that
column's length when the request is taken, not when its result fails to be recorded (after the
call was sent upstream and paid for)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import store
from store.request_kinds import REQUEST_KINDS, BadLine
from store.tables import (
    MAX_CUSTOM_ID_CHARS,
    MAX_FILENAME_CHARS,
    MAX_MODEL_CHARS,
    DiscardedAnswer,
    File,
    ModelPrice,
    Request,
    Result,
)
from tests.store.conftest import IngestFn, chat_line


def test_the_bounds_checked_are_the_ledger_columns() -> None:
    bounded = [
        (Result.__table__.c.model, MAX_MODEL_CHARS),
        (DiscardedAnswer.__table__.c.model, MAX_MODEL_CHARS),
        (ModelPrice.__table__.c.model, MAX_MODEL_CHARS),
        (Request.__table__.c.custom_id, MAX_CUSTOM_ID_CHARS),
        (File.__table__.c.filename, MAX_FILENAME_CHARS),
    ]
    for column, bound in bounded:
        assert isinstance(column.type, sa.String)
        assert column.type.length == bound


@pytest.mark.parametrize("endpoint", sorted(REQUEST_KINDS))
def test_every_request_kind_refuses_a_model_longer_than_the_ledger_keeps(endpoint: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "input": "hi"}
    REQUEST_KINDS[endpoint].check_body({**body, "model": "m" * MAX_MODEL_CHARS}, "body.")
    with pytest.raises(BadLine) as caught:
        REQUEST_KINDS[endpoint].check_body({**body, "model": "m" * (MAX_MODEL_CHARS + 1)}, "body.")
    assert caught.value.param == "body.model"
    assert caught.value.code == "invalid_value"


def test_a_batch_line_with_a_model_too_long_is_rejected_at_ingest(
    ingest: IngestFn, engine: Engine, tenant: store.Tenant
) -> None:
    report = ingest([chat_line("ok"), chat_line("long", model="m" * 5000)], skip_invalid=True)
    assert report.accepted == 1
    assert report.invalid_lines == 1
    assert [(e.line, e.param) for e in report.errors] == [(2, "body.model")]
    assert len(report.errors[0].message) < 200
