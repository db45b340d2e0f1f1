"""Output and error files in the shape of docs/batch-format.md."""

from __future__ import annotations

import json

from sqlalchemy.engine import Engine

import store
from models.types import RequestUsage
from tests.store.conftest import IngestFn, chat_line


def test_output_and_error_files_in_openai_format_and_line_order(engine: Engine, ingest: IngestFn) -> None:
    batch = ingest(4)
    ids = store.pending_request_ids(engine, batch.batch_id)
    body = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"message": {"content": "é"}}]}
    # written out of order: the files still follow the input lines
    store.record_results(
        engine,
        [
            store.ResultRecord(
                ids[3],
                store.RequestStatus.SUCCEEDED,
                body,
                upstream_request_id="req_up_3",
                usage=RequestUsage(),
            ),
            store.ResultRecord(ids[0], store.RequestStatus.SUCCEEDED, body),
            store.ResultRecord(
                ids[2],
                store.RequestStatus.FAILED,
                {"error": {"message": "bad model"}},
                status_code=400,
                error_code="invalid_request_error",
                error_message="bad model",
            ),
            store.ResultRecord(
                ids[1], store.RequestStatus.FAILED, error_code="timeout", error_message="gave up"
            ),
        ],
    )
    output = [json.loads(line) for line in store.iter_output_lines(engine, batch.batch_id)]
    assert output == [
        {
            "id": ids[0],
            "custom_id": "c0",
            "response": {"status_code": 200, "request_id": ids[0], "body": body},
            "error": None,
        },
        {
            "id": ids[3],
            "custom_id": "c3",
            "response": {"status_code": 200, "request_id": "req_up_3", "body": body},
            "error": None,
        },
    ]
    errors = [json.loads(line) for line in store.iter_error_lines(engine, batch.batch_id)]
    assert errors == [
        {
            "id": ids[1],
            "custom_id": "c1",
            "response": None,
            "error": {"code": "timeout", "message": "gave up"},
        },
        {
            "id": ids[2],
            "custom_id": "c2",
            "response": {
                "status_code": 400,
                "request_id": ids[2],
                "body": {"error": {"message": "bad model"}},
            },
            "error": {"code": "invalid_request_error", "message": "bad model"},
        },
    ]
    raw = b"".join(store.iter_output_lines(engine, batch.batch_id))
    assert raw.endswith(b"\n")
    assert raw.count(b"\n") == 2


def test_expired_requests_are_in_the_error_file(engine: Engine, ingest: IngestFn) -> None:
    batch = ingest(2, now=1000)
    store.expire_batches(engine, now=1000 + 25 * 3600)
    errors = [json.loads(line) for line in store.iter_error_lines(engine, batch.batch_id)]
    assert [(e["custom_id"], e["error"]["code"], e["response"]) for e in errors] == [
        ("c0", "batch_expired", None),
        ("c1", "batch_expired", None),
    ]
    assert list(store.iter_output_lines(engine, batch.batch_id)) == []


def test_cancelled_requests_are_in_neither_file(engine: Engine, ingest: IngestFn) -> None:
    batch = ingest(2)
    store.cancel_batch(engine, batch.batch_id)
    assert list(store.iter_error_lines(engine, batch.batch_id)) == []
    assert list(store.iter_output_lines(engine, batch.batch_id)) == []


def _file_bytes(engine: Engine, file_id: str) -> tuple[int | None, int]:
    """(the size kept in the file's row, the size measured by ``with_bytes``)."""
    file = store.get_file(engine, file_id)
    assert file is not None
    kept = file.bytes
    [measured] = store.with_bytes(engine, [file])
    assert measured.bytes is not None
    return kept, measured.bytes


def test_a_result_files_size_is_kept_once_its_batch_can_change_no_more(
    engine: Engine, ingest: IngestFn
) -> None:
    """An expired batch's request still running may answer after the batch's files exist: the
    size is measured at each read until it has, then kept; always what the content adds up to
    (lines whose strings JSON writes as they are, and lines with others, or with no body)."""
    batch = ingest([chat_line("plain-0"), chat_line("ü-1"), chat_line('"✓"')], now=1000)
    ids = store.pending_request_ids(engine, batch.batch_id)
    store.record_results(
        engine, [store.ResultRecord(ids[0], store.RequestStatus.SUCCEEDED, {"text": 'é\n"'})]
    )
    assert store.claim_requests(engine, ids[1:2], "w1", 10**9) != []
    assert store.expire_batches(engine, now=1000 + 25 * 3600) == [batch.batch_id]
    expired = store.get_batch(engine, batch.batch_id)
    assert expired is not None
    assert expired.output_file_id
    assert expired.error_file_id
    output = expired.output_file_id
    assert _file_bytes(engine, output) == (
        None,
        len(b"".join(store.iter_output_lines(engine, batch.batch_id))),
    )
    assert _file_bytes(engine, output)[0] is None  # the running request may still answer: not kept
    store.record_results(engine, [store.ResultRecord(ids[1], store.RequestStatus.SUCCEEDED, None)])
    after = len(b"".join(store.iter_output_lines(engine, batch.batch_id)))
    assert _file_bytes(engine, output) == (None, after)
    assert _file_bytes(engine, output) == (after, after)  # kept from the first read on
    errors = len(b"".join(store.iter_error_lines(engine, batch.batch_id)))
    assert errors > 0
    assert _file_bytes(engine, expired.error_file_id)[1] == errors
