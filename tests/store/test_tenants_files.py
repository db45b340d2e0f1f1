from __future__ import annotations

import hashlib

import pytest
from sqlalchemy.engine import Engine

import store
from models.types import AssistantMessage, FunctionCall, FunctionExecutionResult, UserMessage
from models.types import FunctionExecutionResultMessage as ToolResults
from tests.store.conftest import IngestFn


def test_api_keys_are_hashed_and_revocable(engine: Engine, tenant: store.Tenant) -> None:
    key = store.create_api_key(engine, tenant.id, name="ci")
    other = store.create_api_key(engine, tenant.id)
    found = store.authenticate_api_key(engine, key)
    assert found is not None
    assert found.id == tenant.id
    assert store.authenticate_api_key(engine, key + "x") is None
    with engine.connect() as conn:
        stored = [row[0] for row in conn.exec_driver_sql("SELECT key_hash FROM api_keys")]
    assert key not in stored
    assert hashlib.sha256(key.encode()).hexdigest() in stored
    assert store.revoke_api_key(engine, key)
    assert store.authenticate_api_key(engine, key) is None
    assert not store.revoke_api_key(engine, key)
    assert store.authenticate_api_key(engine, other) is not None


def test_files_belong_to_their_tenant(engine: Engine, tenant: store.Tenant) -> None:
    created = store.create_file(engine, tenant.id, "in.jsonl", "batch", 123, "/data/f1")
    assert created.id.startswith("file-")
    second = store.create_file(engine, tenant.id, "b.jsonl", "batch", 5, "/data/f2")
    got = store.get_file(engine, created.id, tenant.id)
    assert got is not None
    assert (got.filename, got.bytes, got.kind, got.storage_path) == (
        "in.jsonl",
        123,
        store.FileKind.UPLOAD,
        "/data/f1",
    )
    stranger = store.create_tenant(engine, "stranger")
    assert store.get_file(engine, created.id, stranger.id) is None
    listed = store.list_files(engine, tenant.id, purpose="batch")
    assert {f.id for f in listed} == {created.id, second.id}
    page = store.list_files(engine, tenant.id, limit=1)
    rest = store.list_files(engine, tenant.id, after=page[0].id)
    assert [f.id for f in page + rest] == [f.id for f in listed]
    assert store.delete_file(engine, created.id, stranger.id) is None
    assert store.delete_file(engine, created.id, tenant.id) is not None
    assert store.get_file(engine, created.id) is None


def test_list_batches_pages_newest_first(engine: Engine, ingest: IngestFn, tenant: store.Tenant) -> None:
    made = [ingest(1, now=1000 + i).batch_id for i in range(3)]
    page = store.list_batches(engine, tenant.id, limit=2)
    assert [b.id for b in page.data] == made[::-1][:2]
    assert page.has_more
    rest = store.list_batches(engine, tenant.id, after=page.last_id, limit=2)
    assert ([b.id for b in rest.data], rest.has_more) == ([made[0]], False)
    assert store.get_batch(engine, made[0], store.create_tenant(engine, "x").id) is None


def test_conversations_keep_messages_in_order(engine: Engine, tenant: store.Tenant) -> None:
    call = FunctionCall(id="call_1", name="add", arguments='{"a": 1}')
    conversation = store.create_conversation(engine, tenant.id, [UserMessage(content="add 1")])
    length = store.append_messages(
        engine,
        conversation,
        [
            AssistantMessage(content=[call]),
            ToolResults(content=[FunctionExecutionResult(content="2", name="add", call_id="call_1")]),
        ],
    )
    assert length == 3
    assert store.append_messages(engine, conversation, [AssistantMessage(content="2")]) == 4
    messages = store.load_conversation(engine, conversation)
    assert [type(m).__name__ for m in messages] == [
        "UserMessage",
        "AssistantMessage",
        "FunctionExecutionResultMessage",
        "AssistantMessage",
    ]
    assert messages[1] == AssistantMessage(content=[call])
    with pytest.raises(store.ConversationNotFound):
        store.load_conversation(engine, "conv_missing")
    with pytest.raises(store.ConversationNotFound):
        store.append_messages(engine, "conv_missing", [])


def test_set_price_replaces(engine: Engine) -> None:
    store.set_price(engine, "gpt-4o", 9.0, 4.0, 30.0)
    prices = store.get_prices(engine)
    assert prices["gpt-4o"].output_per_million == 30.0
    assert store.price_for(prices, "gpt-4o-2024-08-06") is prices["gpt-4o"]
    assert store.price_for(prices, "gpt-4o-mini-2024-07-18") is prices["gpt-4o-mini"]
    assert store.price_for(prices, "claude") is None
