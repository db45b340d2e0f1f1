from __future__ import annotations

import io
import json

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import store
from tests.store.conftest import IngestFn, chat_line, jsonl


def count_requests(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(store.Request)).scalar_one())


def test_openai_lines_become_queued_requests_in_line_order(engine: Engine, ingest: IngestFn) -> None:
    report = ingest(5, metadata={"project": "x"}, priority=3)
    assert (report.status, report.lines, report.accepted, report.errors) == (
        store.BatchStatus.IN_PROGRESS,
        5,
        5,
        [],
    )
    batch = store.get_batch(engine, report.batch_id)
    assert batch is not None
    assert batch.total_count == 5
    assert batch.batch_metadata == {"project": "x"}
    assert batch.expires_at == batch.created_at + 24 * 3600
    assert batch.in_progress_at == batch.created_at
    ids = store.pending_request_ids(engine, report.batch_id)
    claimed = store.claim_requests(engine, ids, "w", 60)
    assert [c.custom_id for c in claimed] == [f"c{i}" for i in range(5)]
    assert all(c.priority == 3 and c.body["model"] == "gpt-4o-mini" for c in claimed)


def test_short_form_takes_defaults_and_line_params(engine: Engine, ingest: IngestFn) -> None:
    report = ingest(
        [
            {"prompt": "one"},
            {
                "custom_id": "two",
                "messages": [{"role": "user", "content": "2"}],
                "model": "gpt-4o",
                "temperature": 1,
            },
        ],
        defaults={"model": "gpt-4o-mini", "temperature": 0},
    )
    assert report.accepted == 2
    claimed = store.claim_requests(engine, store.pending_request_ids(engine, report.batch_id), "w", 60)
    assert claimed[0].custom_id == "line-1"
    assert claimed[0].body == {
        "model": "gpt-4o-mini",
        "temperature": 0,
        "messages": [{"role": "user", "content": "one"}],
    }
    assert claimed[1].custom_id == "two"
    assert claimed[1].body == {
        "model": "gpt-4o",
        "temperature": 1,
        "messages": [{"role": "user", "content": "2"}],
    }


def test_agent_run_lines_are_accepted_on_the_agent_endpoint(engine: Engine, ingest: IngestFn) -> None:
    report = ingest(
        [
            {
                "custom_id": "a",
                "method": "POST",
                "url": "/v1/agent_runs",
                "body": {"model": "m", "input": "go"},
            },
            {"prompt": "short", "model": "m"},
        ],
        endpoint="/v1/agent_runs",
    )
    assert report.accepted == 2, report.errors
    claimed = store.claim_requests(engine, store.pending_request_ids(engine, report.batch_id), "w", 60)
    assert {c.kind for c in claimed} == {store.RequestKind.AGENT_RUN}
    assert claimed[1].body == {"model": "m", "input": "short"}


BAD_LINES: list[tuple[object, str, str | None]] = [
    ("{not json", "invalid_json", None),
    ("[1, 2]", "invalid_line", None),
    ({"method": "POST", "url": "/v1/chat/completions", "body": {}}, "missing_field", "custom_id"),
    (
        {"custom_id": 7, "method": "POST", "url": "/v1/chat/completions", "body": {}},
        "wrong_type",
        "custom_id",
    ),
    ({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions"}, "missing_field", "body"),
    ({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": "hi"}, "wrong_type", "body"),
    (
        {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}},
        "missing_field",
        "body.model",
    ),
    (
        {
            "custom_id": "x",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": {}},
        },
        "wrong_type",
        "body.messages",
    ),
    (
        {"custom_id": "x", "method": "GET", "url": "/v1/chat/completions", "body": {}},
        "invalid_method",
        "method",
    ),
    ({"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {}}, "unknown_endpoint", "url"),
    ({"custom_id": "x", "method": "POST", "url": "/v1/agent_runs", "body": {}}, "mismatched_endpoint", "url"),
    ({"custom_id": "x"}, "missing_field", "prompt"),
    ({"prompt": 3, "model": "m"}, "wrong_type", "prompt"),
    ({"prompt": "no model anywhere"}, "missing_field", "model"),
    ({"custom_id": "", "prompt": "p", "model": "m"}, "invalid_value", "custom_id"),
    # PostgreSQL text cannot hold NUL: refused with its line, not a database error.
    ({"custom_id": "a\u0000b", "prompt": "p", "model": "m"}, "nul_character", "custom_id"),
]


@pytest.mark.parametrize(("line", "code", "param"), BAD_LINES, ids=[f"{c}-{p}" for _, c, p in BAD_LINES])
def test_each_bad_line_is_reported_with_its_line_number(
    engine: Engine, ingest: IngestFn, line: object, code: str, param: str | None
) -> None:
    report = ingest([chat_line("ok-1"), chat_line("ok-2"), line, chat_line("ok-3")])
    assert report.rejected
    assert [(e.line, e.code, e.param) for e in report.errors] == [(3, code, param)]
    assert report.errors[0].message
    assert count_requests(engine) == 0


def test_duplicate_custom_id_names_the_first_line(engine: Engine, ingest: IngestFn) -> None:
    report = ingest([chat_line("a"), chat_line("b"), chat_line("a")])
    assert [(e.line, e.code) for e in report.errors] == [(3, "duplicate_custom_id")]
    assert "line 1" in report.errors[0].message


def test_body_too_large_is_reported_and_the_rest_still_validated(engine: Engine, ingest: IngestFn) -> None:
    report = ingest(
        [chat_line("a"), chat_line("big", content="x" * 5000), "{oops", chat_line("b")],
        max_body_bytes=1000,
    )
    assert [(e.line, e.code) for e in report.errors] == [(2, "body_too_large"), (3, "invalid_json")]
    assert report.invalid_lines == 2


def test_rejected_batch_keeps_all_errors_and_writes_no_request(engine: Engine, ingest: IngestFn) -> None:
    lines: list[object] = [chat_line(f"c{i}") for i in range(30)]
    lines[4] = "nope"
    lines[25] = {"custom_id": "c1", "prompt": "dup", "model": "m"}
    report = ingest(lines, chunk_size=10)  # good chunks were inserted before the bad line: rolled back
    assert [(e.line, e.code) for e in report.errors] == [(5, "invalid_json"), (26, "duplicate_custom_id")]
    assert count_requests(engine) == 0
    batch = store.get_batch(engine, report.batch_id)
    assert batch is not None
    assert batch.status == store.BatchStatus.FAILED
    assert batch.failed_at is not None
    assert batch.total_count == 0
    assert batch.errors == [e.to_openai() for e in report.errors]
    assert store.pending_request_ids(engine, report.batch_id) == []


def test_skip_invalid_keeps_the_good_lines(engine: Engine, ingest: IngestFn) -> None:
    report = ingest([chat_line("a"), "bad", chat_line("b")], skip_invalid=True)
    assert (report.status, report.accepted, report.invalid_lines) == (store.BatchStatus.IN_PROGRESS, 2, 1)
    assert report.errors[0].line == 2
    assert count_requests(engine) == 2


def test_a_batch_with_no_good_line_is_rejected(engine: Engine, ingest: IngestFn) -> None:
    assert ingest(["bad"], skip_invalid=True).rejected
    empty = ingest(["", "  "])
    assert empty.rejected
    assert [(e.line, e.code) for e in empty.errors] == [(None, "empty_file")]
    assert count_requests(engine) == 0


def test_blank_lines_are_skipped_but_counted_in_line_numbers(engine: Engine, ingest: IngestFn) -> None:
    report = ingest([chat_line("a"), "", "bad"])
    assert [(e.line, e.code) for e in report.errors] == [(3, "invalid_json")]


def test_too_many_lines_rejects_even_with_skip_invalid(engine: Engine, ingest: IngestFn) -> None:
    report = ingest(5, max_lines=3, skip_invalid=True)
    assert report.rejected
    assert [(e.line, e.code) for e in report.errors] == [(4, "too_many_lines")]
    assert count_requests(engine) == 0


def test_errors_kept_are_capped_but_all_counted(engine: Engine, ingest: IngestFn) -> None:
    report = ingest(["bad"] * 20, max_errors=5)
    assert report.invalid_lines == 20
    assert len(report.errors) == 5


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"endpoint": "/v1/embeddings"}, "endpoint"),
        ({"completion_window": "1d"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ],
)
def test_bad_batch_parameters_raise_and_write_nothing(
    engine: Engine, tenant: store.Tenant, kwargs: dict[str, object], param: str
) -> None:
    with pytest.raises(store.InvalidArgument) as caught:
        store.ingest_batch(engine, jsonl([chat_line("a")]), tenant_id=tenant.id, **kwargs)  # type: ignore[arg-type]
    assert caught.value.param == param
    assert store.list_batches(engine, tenant.id).data == []


def test_crlf_and_unicode_lines(engine: Engine, ingest: IngestFn) -> None:
    source = (json.dumps(chat_line("é", content="日本")) + "\r\n").encode()
    report = store.ingest_batch(engine, io.BytesIO(source), tenant_id=store.create_tenant(engine, "u").id)
    assert report.accepted == 1
    claimed = store.claim_requests(engine, store.pending_request_ids(engine, report.batch_id), "w", 60)
    assert claimed[0].custom_id == "é"
    assert claimed[0].body["messages"][0]["content"] == "日本"


def test_awkward_characters_survive_the_bulk_load(engine: Engine, ingest: IngestFn) -> None:
    custom_id = 'tab\there back\\slash nl\nquote"'
    content = 'line1\nline2\ttab \\ backslash \\n not-a-newline "quoted" \u0001 日本'
    report = ingest([chat_line(custom_id, content=content)])
    assert report.accepted == 1, report.errors
    claimed = store.claim_requests(engine, store.pending_request_ids(engine, report.batch_id), "w", 60)
    assert claimed[0].custom_id == custom_id
    assert claimed[0].body["messages"][0]["content"] == content


def nested(levels: int) -> object:
    value: object = "deep"
    for _ in range(levels):
        value = [value]
    return value


# Each of these was accepted once and then failed every delivery in the worker (or was a 500).
# Raw JSON text: json.dumps would not write most of them.
WORKER_POISON: list[tuple[str, str, str | None]] = [
    (
        '{"custom_id": "s", "prompt": "\\ud800 alone", "model": "m"}',
        "lone_surrogate",
        "prompt",
    ),
    (
        '{"custom_id": "s", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", '
        '"messages": [{"role": "user", "content": "x\\udfffy"}]}}',
        "lone_surrogate",
        "body.messages[0].content",
    ),
    ('{"custom_id": "n", "prompt": "p", "model": "m", "seed": NaN}', "non_finite_number", "seed"),
    ('{"custom_id": "i", "prompt": "p", "model": "m", "temperature": Infinity}', "non_finite_number", None),
    ('{"custom_id": "i", "prompt": "p", "model": "m", "top_p": -Infinity}', "non_finite_number", "top_p"),
    ('{"custom_id": "e", "prompt": "p", "model": "m", "temperature": 1e999}', "non_finite_number", None),
    ('{"custom_id": "z", "prompt": "p", "model": "m\\u0000"}', "nul_character", "model"),
    ('{"custom_id": "z", "prompt": "p", "model": "m", "metadata": {"k\\u0000": 1}}', "nul_character", None),
    (
        json.dumps({"custom_id": "d", "prompt": "p", "model": "m", "extra": nested(store.MAX_JSON_DEPTH)}),
        "nesting_too_deep",
        None,
    ),
    ("[" * 5000 + "]" * 5000, "nesting_too_deep", None),  # deeper than Python's own recursion limit
]


@pytest.mark.parametrize(
    ("line", "code", "param"), WORKER_POISON, ids=[f"{i}-{c}" for i, (_, c, _) in enumerate(WORKER_POISON)]
)
def test_what_a_worker_would_choke_on_is_refused_by_line_and_code(
    engine: Engine, ingest: IngestFn, line: str, code: str, param: str | None
) -> None:
    rejected = ingest([chat_line("ok-1"), chat_line("ok-2"), line, chat_line("ok-3")])
    assert rejected.rejected
    assert [(e.line, e.code) for e in rejected.errors] == [(3, code)]
    if param is not None:
        assert rejected.errors[0].param == param
    assert count_requests(engine) == 0

    skipped = ingest([chat_line("ok-1"), chat_line("ok-2"), line, chat_line("ok-3")], skip_invalid=True)
    assert (skipped.status, skipped.accepted, skipped.invalid_lines) == (store.BatchStatus.IN_PROGRESS, 3, 1)
    batch = store.get_batch(engine, skipped.batch_id)
    assert batch is not None
    assert batch.errors is not None
    assert [(e["line"], e["code"]) for e in batch.errors] == [(3, code)]
    assert batch.error_count == 1
    # what was written reads back whole
    claimed = store.claim_requests(engine, store.pending_request_ids(engine, skipped.batch_id), "w", 60)
    assert [c.custom_id for c in claimed] == ["ok-1", "ok-2", "ok-3"]


def test_nesting_up_to_the_limit_is_accepted(engine: Engine, ingest: IngestFn) -> None:
    # the line object is level 1, so the value may hold MAX_JSON_DEPTH - 1 levels
    line = {"custom_id": "d", "prompt": "p", "model": "m", "extra": nested(store.MAX_JSON_DEPTH - 1)}
    report = ingest([line])
    assert report.accepted == 1, report.errors
    claimed = store.claim_requests(engine, store.pending_request_ids(engine, report.batch_id), "w", 60)
    assert claimed[0].body["extra"] == line["extra"]


def test_surrogate_pairs_and_escaped_text_are_kept(engine: Engine, ingest: IngestFn) -> None:
    line = '{"custom_id": "\\u00e9", "prompt": "\\ud83d\\ude00 \\\\u0000 \\\\ud800 \\u00e9", "model": "m"}'
    report = ingest([line])
    assert report.accepted == 1, report.errors
    claimed = store.claim_requests(engine, store.pending_request_ids(engine, report.batch_id), "w", 60)
    assert claimed[0].custom_id == "é"
    assert claimed[0].body["messages"][0]["content"] == "\U0001f600 \\u0000 \\ud800 é"


@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        ({"defaults": {"model": "m\x00"}}, "model", "nul_character"),
        ({"defaults": {"model": "m\ud800"}}, "model", "lone_surrogate"),
        ({"metadata": {"k": "v\x00"}}, "metadata.k", "nul_character"),
    ],
)
def test_batch_level_values_get_the_same_checks(
    engine: Engine, tenant: store.Tenant, kwargs: dict[str, object], param: str, code: str
) -> None:
    with pytest.raises(store.InvalidArgument) as caught:
        store.ingest_batch(engine, jsonl([{"prompt": "p"}]), tenant_id=tenant.id, **kwargs)  # type: ignore[arg-type]
    assert (caught.value.param, caught.value.code) == (param, code)
    assert store.list_batches(engine, tenant.id).data == []


def test_errors_never_echo_unbounded_input(engine: Engine, ingest: IngestFn) -> None:
    huge = "u" * 200_000
    lines: list[object] = [
        {**chat_line("a"), "url": huge},
        {**chat_line("b"), "method": huge},
        {"custom_id": "c", "prompt": "p", "model": "m", huge: "\x00"},
        chat_line("d" * 500),
        chat_line("d" * 500),
        *(["{bad"] * (2 * store.MAX_STORED_ERRORS)),
    ]
    report = ingest(lines, max_body_bytes=1024 * 1024)
    assert report.rejected
    batch = store.get_batch(engine, report.batch_id)
    assert batch is not None
    assert batch.errors is not None
    assert [(e["line"], e["code"]) for e in batch.errors[:4]] == [
        (1, "unknown_endpoint"),
        (2, "invalid_method"),
        (3, "nul_character"),
        (5, "duplicate_custom_id"),
    ]
    assert len(batch.errors) == store.MAX_STORED_ERRORS
    assert batch.error_count == 4 + 2 * store.MAX_STORED_ERRORS
    for error in batch.errors[:4]:
        assert len(error["message"]) < 400, error["message"]
        assert error["param"] is None or len(error["param"]) < 250
    assert "200000 characters" in batch.errors[0]["message"]
    assert len(json.dumps(batch.errors)) < 40_000


def test_duplicates_are_found_among_many_ids(engine: Engine, ingest: IngestFn) -> None:
    lines: list[object] = [chat_line(f"id-{i}") for i in range(5000)]
    lines.append(chat_line("id-1234"))
    report = ingest(lines)
    assert [(e.line, e.code) for e in report.errors] == [(5001, "duplicate_custom_id")]
    assert "line 1235" in report.errors[0].message
    assert ingest(lines[:5000]).accepted == 5000


def test_rows_are_sent_in_chunks_bounded_by_bytes(engine: Engine, ingest: IngestFn) -> None:
    lines = [chat_line(f"c{i}", content="x" * (i * 100)) for i in range(40)]
    report = ingest(lines, chunk_bytes=1000)
    assert report.accepted == 40, report.errors
    claimed = store.claim_requests(engine, store.pending_request_ids(engine, report.batch_id), "w", 60)
    assert [c.body["messages"][0]["content"] for c in claimed] == ["x" * (i * 100) for i in range(40)]


def test_an_opened_batch_is_validating_until_its_lines_are_read(engine: Engine, tenant: store.Tenant) -> None:
    spec = store.open_batch(engine, store.prepare_batch(tenant_id=tenant.id, metadata={"p": "q"}))
    opened = store.get_batch(engine, spec.batch_id)
    assert opened is not None
    assert (opened.status, opened.total_count) == (store.BatchStatus.VALIDATING, 0)
    assert store.pending_request_ids(engine, spec.batch_id) == []
    report = store.fill_batch(engine, spec, jsonl([chat_line("a"), "bad", chat_line("b")]), skip_invalid=True)
    assert (report.status, report.accepted) == (store.BatchStatus.IN_PROGRESS, 2)
    batch = store.get_batch(engine, spec.batch_id)
    assert batch is not None
    assert (batch.status, batch.total_count, batch.error_count) == (store.BatchStatus.IN_PROGRESS, 2, 1)
    assert batch.in_progress_at is not None
    assert len(store.pending_request_ids(engine, spec.batch_id)) == 2

    rejected = store.open_batch(engine, store.prepare_batch(tenant_id=tenant.id))
    assert store.fill_batch(engine, rejected, jsonl([chat_line("a"), "bad"])).rejected
    failed = store.get_batch(engine, rejected.batch_id)
    assert failed is not None
    assert failed.status == store.BatchStatus.FAILED
    assert [(e["line"], e["code"]) for e in failed.errors or []] == [(2, "invalid_json")]


def test_a_batch_cancelled_while_validating_gets_no_request(engine: Engine, tenant: store.Tenant) -> None:
    spec = store.open_batch(engine, store.prepare_batch(tenant_id=tenant.id))
    assert store.cancel_batch(engine, spec.batch_id).status == store.BatchStatus.CANCELLED
    report = store.fill_batch(engine, spec, jsonl([chat_line("a"), chat_line("b")]))
    assert report.status == store.BatchStatus.CANCELLED
    assert count_requests(engine) == 0
    batch = store.get_batch(engine, spec.batch_id)
    assert batch is not None
    assert batch.status == store.BatchStatus.CANCELLED
    assert not store.fail_batch(engine, spec.batch_id, "file_not_found", "gone")


def test_a_validating_batch_whose_file_is_gone_fails_by_name(engine: Engine, tenant: store.Tenant) -> None:
    spec = store.open_batch(engine, store.prepare_batch(tenant_id=tenant.id))
    assert store.fail_batch(engine, spec.batch_id, "file_not_found", "the input file is gone")
    batch = store.get_batch(engine, spec.batch_id)
    assert batch is not None
    assert batch.status == store.BatchStatus.FAILED
    assert batch.errors == [
        {"line": None, "code": "file_not_found", "message": "the input file is gone", "param": None}
    ]


class CancelsWhileRead(io.BytesIO):
    """A file that cancels its batch (from another connection) once ``after`` lines were read."""

    def __init__(self, data: bytes, engine: Engine, batch_id: str, after: int) -> None:
        super().__init__(data)
        self.engine, self.batch_id, self.after, self.read_lines = engine, batch_id, after, 0

    def readline(self, size: int | None = -1) -> bytes:
        self.read_lines += 1
        if self.read_lines == self.after:
            store.cancel_batch(self.engine, self.batch_id)
        return super().readline(size)


# PostgreSQL only: SQLite has one writer, so the cancel would wait for the ingest to end.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_batch_cancelled_while_its_file_is_read_stops_reading(engine: Engine, tenant: store.Tenant) -> None:
    spec = store.open_batch(engine, store.prepare_batch(tenant_id=tenant.id))
    data = jsonl([chat_line(f"c{i}") for i in range(1000)]).getvalue()
    source = CancelsWhileRead(data, engine, spec.batch_id, after=10)
    report = store.fill_batch(engine, spec, source, chunk_size=5)
    assert report.status == store.BatchStatus.CANCELLED
    assert report.lines < 20  # it stopped at the first chunk after the cancel
    assert count_requests(engine) == 0
