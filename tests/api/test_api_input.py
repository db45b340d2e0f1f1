"""Auth, tenant isolation and hostile input against a live ``tokenmill api``, through the official
``openai`` SDK (and raw HTTP where the SDK would hide the answer)."""

from __future__ import annotations

import io
import json

import httpx
import openai
import pytest
import sqlalchemy as sa

import store
from tests.api.conftest import LiveAPI


def client(api: LiveAPI, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.base_url, api_key=key, max_retries=0)


def jsonl(*lines: object) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


def batch_line(custom_id: str, content: str = "hi") -> dict[str, object]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "sim-model", "messages": [{"role": "user", "content": content}]},
    }


def count_rows(api: LiveAPI, table: type[store.File | store.Request], tenant: str) -> int:
    engine = store.make_engine(api.database_url)
    try:
        with engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(table).where(table.tenant_id == tenant)
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


def test_missing_wrong_and_revoked_keys_are_refused(live_api: LiveAPI) -> None:
    answer = httpx.get(f"{live_api.base_url}/batches")
    assert answer.status_code == 401
    assert "API key" in answer.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        client(live_api, "tm-not-a-key").batches.list()
    key = live_api.new_key("revoked")
    assert client(live_api, key).batches.list().data == []
    revoked = live_api.cli("keys", "revoke", key)
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(openai.AuthenticationError):
        client(live_api, key).batches.list()


def test_a_tenant_never_sees_another_tenants_objects(live_api: LiveAPI) -> None:
    alice = client(live_api, live_api.new_key("alice"))
    bob = client(live_api, live_api.new_key("bob"))
    uploaded = alice.files.create(file=("in.jsonl", jsonl(batch_line("a"))), purpose="batch")
    batch = alice.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "in_progress"
    assert batch.request_counts is not None
    assert batch.request_counts.total == 1
    for attempt in (
        lambda: bob.files.retrieve(uploaded.id),
        lambda: bob.files.content(uploaded.id),
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
        lambda: bob.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert bob.batches.list().data == []
    assert [b.id for b in alice.batches.list().data] == [batch.id]
    assert alice.files.content(uploaded.id).content == jsonl(batch_line("a"))


def test_oversized_upload_is_refused_and_leaves_nothing(live_api: LiveAPI) -> None:
    api = client(live_api, live_api.new_key("big-uploader"))
    big = jsonl(*(batch_line(f"r{i}", "x" * 500) for i in range(200)))  # > the 64 KiB limit
    with pytest.raises(openai.APIStatusError) as raised:
        api.files.create(file=("big.jsonl", big), purpose="batch")
    assert raised.value.status_code == 413
    assert "limit" in raised.value.message
    assert api.files.list().data == []
    assert count_rows(live_api, store.File, "big-uploader") == 0


def test_malformed_upload_gives_a_failed_batch_naming_every_bad_line(live_api: LiveAPI) -> None:
    api = client(live_api, live_api.new_key("sloppy"))
    content = jsonl(
        batch_line("ok-1"),
        b"{not json",
        batch_line("ok-1"),  # duplicate custom_id
        {**batch_line("wrong-url"), "url": "/v1/embeddings"},
        {"custom_id": "no-body", "method": "POST", "url": "/v1/chat/completions"},
        batch_line("ok-2"),
    )
    uploaded = api.files.create(file=io.BytesIO(content), purpose="batch")
    batch = api.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed"
    assert batch.errors is not None
    assert batch.errors.data is not None
    by_line = {error.line: error.code for error in batch.errors.data}
    assert set(by_line) == {2, 3, 4, 5}
    assert by_line[2] == "invalid_json"
    assert by_line[3] == "duplicate_custom_id"
    assert all(error.message for error in batch.errors.data)
    assert count_rows(live_api, store.Request, "sloppy") == 0  # rejected whole, as OpenAI does


def test_bad_create_arguments_are_named(live_api: LiveAPI) -> None:
    api = client(live_api, live_api.new_key("confused"))
    with pytest.raises(openai.NotFoundError, match="file-nope"):
        api.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    uploaded = api.files.create(file=("in.jsonl", jsonl(batch_line("a"))), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        api.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="metadata"):
        api.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={f"k{i}": "v" for i in range(17)},
        )
    with pytest.raises(openai.BadRequestError, match="purpose"):
        api.files.create(file=("in.jsonl", jsonl(batch_line("a"))), purpose="fine-tune")
    assert count_rows(live_api, store.Request, "confused") == 0


def test_errors_are_json_in_openais_shape(live_api: LiveAPI) -> None:
    headers = {"Authorization": f"Bearer {live_api.new_key('raw-http')}"}
    cases = [
        httpx.post(f"{live_api.base_url}/chat/completions", headers=headers, content=b"{" + b" " * 9000),
        httpx.post(f"{live_api.base_url}/chat/completions", headers=headers, content=b"[not json"),
        httpx.post(f"{live_api.base_url}/batches", headers=headers, json={"endpoint": 3}),
        httpx.get(f"{live_api.base_url}/batches/batch_missing", headers=headers),
        httpx.get(f"{live_api.base_url}/no/such/route", headers=headers),
    ]
    assert [answer.status_code for answer in cases] == [413, 400, 400, 404, 404]
    for answer in cases:
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"]


def test_health_readiness_and_openapi(live_api: LiveAPI) -> None:
    assert httpx.get(f"{live_api.root}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{live_api.root}/readyz")
    assert ready.status_code == 200, ready.text
    spec = httpx.get(f"{live_api.root}/openapi.json").json()
    assert "/v1/batches" in spec["paths"]


def test_models_lists_what_the_service_is_set_up_for(live_api: LiveAPI) -> None:
    sdk = client(live_api, live_api.new_key("models"))
    listed = {model.id: model for model in sdk.models.list()}
    assert "gpt-4o-mini" in listed  # the default model, priced as well
    assert listed["gpt-4o-mini"].owned_by == "tokenmill"
    assert listed["gpt-4o-mini"].created > 0  # when its price was set
    assert sdk.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError, match="'no-such-model' does not exist"):
        sdk.models.retrieve("no-such-model")
    assert httpx.get(f"{live_api.base_url}/models").status_code == 401


def test_prices_set_and_list_from_the_cli(live_api: LiveAPI) -> None:
    done = live_api.cli("prices", "set", "acme-model-x", "--input", "2.5", "--output", "10")
    assert done.returncode == 0, done.stderr
    listed = live_api.cli("prices", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "acme-model-x" in line)
    assert "2.5" in row and "10" in row  # noqa: PT018
    # Cached input defaults to the input price; the model now shows in /v1/models.
    engine = store.make_engine(live_api.database_url)
    try:
        price = store.get_prices(engine)["acme-model-x"]
    finally:
        engine.dispose()
    assert price.input_per_million == price.cached_input_per_million == 2.5
    assert price.output_per_million == 10
    sdk = client(live_api, live_api.new_key("prices"))
    assert sdk.models.retrieve("acme-model-x").id == "acme-model-x"
    refused = live_api.cli("prices", "set", "acme-model-x", "--input", "-1", "--output", "1")
    assert refused.returncode != 0
    assert "--input" in refused.stderr


def test_usage_with_an_instant_past_year_9999_is_refused_by_name(live_api: LiveAPI) -> None:
    key = live_api.new_key("usage-bounds")
    answer = httpx.get(
        f"{live_api.base_url}/usage",
        params={"until": str(10**35)},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert answer.status_code == 400
    assert "until" in json.dumps(answer.json()["error"])


# Raw JSON bodies a worker could not run (json.dumps would not write most of them), with the
# code the API names: each was a 500, or accepted and then failed every delivery.
POISON_BODIES: list[tuple[bytes, str]] = [
    (
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        "non_finite_number",
    ),
    (
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
        "non_finite_number",
    ),
    (
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}',
        "non_finite_number",
    ),
    (
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
        "non_finite_number",
    ),
    (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', "lone_surrogate"),
    (b'{"model": "m\\u0000", "messages": [{"role": "user", "content": "hi"}]}', "nul_character"),
    (
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": '
        + b"[" * 100
        + b"]" * 100
        + b"}",
        "nesting_too_deep",
    ),
    (b'{"model": "m", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}", "nesting_too_deep"),
]


@pytest.mark.parametrize("path", ["/chat/completions", "/agent_runs"])
def test_single_requests_refuse_what_a_worker_would_choke_on_by_name(live_api: LiveAPI, path: str) -> None:
    key = live_api.new_key(f"poison{path.replace('/', '-')}")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    for body, code in POISON_BODIES:
        if path == "/agent_runs":
            body = body.replace(b'"messages"', b'"input"', 1)
        answer = httpx.post(f"{live_api.base_url}{path}", headers=headers, content=body, timeout=30)
        assert answer.status_code == 400, (body[:80], answer.text[:300])
        error = answer.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", code), body[:80]
    assert count_rows(live_api, store.Request, f"poison{path.replace('/', '-')}") == 0


def test_a_poisoned_line_is_named_and_skip_invalid_runs_the_rest(live_api: LiveAPI) -> None:
    api = client(live_api, live_api.new_key("poisoned-lines"))
    good = json.dumps(batch_line("good-1")).encode()
    content = b"\n".join(
        [
            good,
            good.replace(b"good-1", b"surrogate").replace(b'"hi"', b'"\\udc00"'),
            good.replace(b"good-1", b"nan").replace(b'"sim-model",', b'"sim-model", "temperature": NaN,'),
            good.replace(b"good-1", b"big").replace(b'"sim-model",', b'"sim-model", "seed": 1e999,'),
            good.replace(b"good-1", b"nul").replace(b'"sim-model"', b'"sim\\u0000model"'),
            good.replace(b"good-1", b"deep").replace(b'"hi"', b"[" * 80 + b"]" * 80),
            json.dumps(batch_line("good-2")).encode(),
        ]
    )
    uploaded = api.files.create(file=("poison.jsonl", content), purpose="batch")
    expected = [
        (2, "lone_surrogate"),
        (3, "non_finite_number"),
        (4, "non_finite_number"),
        (5, "nul_character"),
        (6, "nesting_too_deep"),
    ]
    rejected = api.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert rejected.status == "failed"
    assert rejected.errors is not None
    assert rejected.errors.data is not None
    assert [(error.line, error.code) for error in rejected.errors.data] == expected
    assert rejected.errors.data[1].param == "body.temperature"
    assert count_rows(live_api, store.Request, "poisoned-lines") == 0

    skipped = api.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"skip_invalid": True},
    )
    assert skipped.status == "in_progress"
    assert skipped.request_counts is not None
    assert skipped.request_counts.total == 2
    assert skipped.errors is not None
    assert skipped.errors.data is not None
    assert [(error.line, error.code) for error in skipped.errors.data] == expected
    assert (skipped.errors.model_extra or {}).get("total_count") == len(expected)
    assert api.batches.retrieve(skipped.id).errors == skipped.errors
    assert count_rows(live_api, store.Request, "poisoned-lines") == 2


def test_a_batch_default_model_with_a_nul_is_refused_by_name(live_api: LiveAPI) -> None:
    api = client(live_api, live_api.new_key("nul-model"))
    uploaded = api.files.create(file=("in.jsonl", jsonl({"prompt": "hi"})), purpose="batch")
    with pytest.raises(openai.BadRequestError) as raised:
        api.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"model": "sim\u0000model"},
        )
    assert raised.value.code == "nul_character"
    assert api.batches.list().data == []


def test_a_validation_error_echoes_input_bounded_and_encodable(live_api: LiveAPI) -> None:
    headers = {"Authorization": f"Bearer {live_api.new_key('echoes')}", "Content-Type": "application/json"}
    long_key = "k" * 7000
    for body in (
        json.dumps({"input_file_id": "file-x", "endpoint": "/v1/chat/completions", long_key: 1}).encode(),
        b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "\\ud800": 1}',
        b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "metadata": {"\\udc00": 7}}',
    ):
        answer = httpx.post(f"{live_api.base_url}/batches", headers=headers, content=body)
        assert answer.status_code == 400, answer.text[:300]
        error = answer.json()["error"]
        assert len(error["message"]) < 1200
        assert error["param"] is None or len(error["param"]) < 250


def test_a_chat_completion_checks_its_key_before_its_body(live_api: LiveAPI) -> None:
    """The key is looked up with the call's submit (one thread hop): a body refused before that
    still hears 401 when the key is unknown, as on every route."""
    url = f"{live_api.base_url}/chat/completions"
    wrong = {"Authorization": "Bearer tm-not-a-key"}
    right = {"Authorization": f"Bearer {live_api.new_key('key-first')}"}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    bodies: list[dict[str, object]] = [
        {"content": b"[not json"},
        {"json": {**chat, "stream": "yes"}},
        {"json": {"model": "gpt-4o-mini", "messages": "hi"}},
    ]
    for body in bodies:
        answer = httpx.post(url, headers=wrong, **body)  # type: ignore[arg-type]
        assert answer.status_code == 401, (body, answer.text)
        assert "Incorrect API key" in answer.json()["error"]["message"]
        assert httpx.post(url, **body).status_code == 401  # type: ignore[arg-type]
    refused = [httpx.post(url, headers=right, **body).status_code for body in bodies]  # type: ignore[arg-type]
    assert refused == [400, 400, 400]
