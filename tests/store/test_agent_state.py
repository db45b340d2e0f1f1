"""Agent state (upsert, versions, tenants) and idempotent conversation appends, on both databases."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.engine import Engine

import store
from models.types import AssistantMessage, LLMMessage, UserMessage


def test_agent_state_upserts_per_tenant_and_agent(engine: Engine, tenant: store.Tenant) -> None:
    assert store.load_agent_state(engine, "assistant", "k1", tenant.id) is None
    assert store.save_agent_state(engine, "assistant", "k1", {"n": 1}, tenant.id) == 1
    assert store.save_agent_state(engine, "assistant", "k1", {"n": 2, "nested": [1, "x"]}, tenant.id) == 2
    assert store.load_agent_state(engine, "assistant", "k1", tenant.id) == {"n": 2, "nested": [1, "x"]}
    # Another key, another tenant, no tenant: separate agents.
    assert store.load_agent_state(engine, "assistant", "k2", tenant.id) is None
    assert store.load_agent_state(engine, "assistant", "k1") is None
    store.save_agent_state(engine, "assistant", "k1", {"n": 99})
    assert store.load_agent_state(engine, "assistant", "k1") == {"n": 99}
    assert store.load_agent_state(engine, "assistant", "k1", tenant.id) == {"n": 2, "nested": [1, "x"]}


def test_a_save_based_on_a_stale_version_is_refused(engine: Engine) -> None:
    assert store.save_agent_state(engine, "a", "k", {"v": "first"}, expected_version=0) == 1
    with pytest.raises(store.AgentStateConflict):
        store.save_agent_state(engine, "a", "k", {"v": "racing create"}, expected_version=0)
    loaded = store.get_agent_state(engine, "a", "k")
    assert loaded is not None
    assert loaded.version == 1
    assert (
        store.save_agent_state(
            engine, "a", "k", {"v": "second"}, expected_version=1, message_id="m1", reply={"ok": True}
        )
        == 2
    )
    with pytest.raises(store.AgentStateConflict):
        store.save_agent_state(engine, "a", "k", {"v": "lost update"}, expected_version=1)
    final = store.get_agent_state(engine, "a", "k")
    assert final == store.StoredAgentState({"v": "second"}, 2, "m1", {"ok": True})


def test_the_save_that_answers_a_message_marks_it_answered(engine: Engine, tenant: store.Tenant) -> None:
    """The reply is saved with the state and the message is answered in one transaction: a worker
    killed right after the save leaves nothing to send again, even once a later message has
    become the agent's last one (which would hide the first's reply from a redelivery)."""
    for message_id in ("m1", "m2"):
        store.record_agent_message(
            engine, message_id, agent_type="a", agent_key="k", payload={}, tenant_id=tenant.id
        )
    assert store.claim_agent_message(engine, "m1", tenant.id, "w1", lease_seconds=-1) == 1
    store.save_agent_state(
        engine, "a", "k", {"n": 1}, tenant.id, expected_version=0, message_id="m1", reply={"ok": True}
    )
    # killed here, before any other write; then the agent answers m2
    assert store.claim_agent_message(engine, "m2", tenant.id, "w2", lease_seconds=30) == 1
    store.save_agent_state(
        engine, "a", "k", {"n": 2}, tenant.id, expected_version=1, message_id="m2", reply={"ok": True}
    )
    now = int(time.time()) + 60
    assert store.agent_messages_to_resend(engine, now=now, limit=10) == []
    assert store.claim_agent_message(engine, "m1", tenant.id, "w3", lease_seconds=30, now=now) is None


def test_a_redone_run_appends_once_and_reads_what_it_first_saw(engine: Engine, tenant: store.Tenant) -> None:
    first: list[LLMMessage] = [
        UserMessage(content="q1", source="user"),
        AssistantMessage(content="a1", source="assistant"),
    ]
    conversation = store.create_conversation(engine, tenant.id, first, conversation_id="conv_r1", run_id="r1")
    # The run is redone: the same deterministic id and run id create and append nothing again.
    assert (
        store.create_conversation(engine, tenant.id, first, conversation_id="conv_r1", run_id="r1")
        == conversation
    )
    follow: list[LLMMessage] = [
        UserMessage(content="q2", source="user"),
        AssistantMessage(content="a2", source="assistant"),
    ]
    assert store.append_messages(engine, conversation, follow, run_id="r2") == 4
    assert store.append_messages(engine, conversation, follow, run_id="r2") == 4
    assert [m.content for m in store.load_conversation(engine, conversation)] == ["q1", "a1", "q2", "a2"]
    # What the follow-up run saw before it appended, for its redo.
    assert [m.content for m in store.load_conversation(engine, conversation, before_run="r2")] == ["q1", "a1"]
    assert store.load_conversation(engine, conversation, before_run="unknown-run") == store.load_conversation(
        engine, conversation
    )
    # Appends without a run id are not deduplicated.
    assert store.append_messages(engine, conversation, follow[:1]) == 5


def test_conversations_are_tenant_scoped(engine: Engine, tenant: store.Tenant) -> None:
    other = store.create_tenant(engine, "other")
    conversation = store.create_conversation(engine, tenant.id, [UserMessage(content="hi", source="user")])
    assert len(store.load_conversation(engine, conversation, tenant_id=tenant.id)) == 1
    with pytest.raises(store.ConversationNotFound):
        store.load_conversation(engine, conversation, tenant_id=other.id)
    with pytest.raises(store.ConversationNotFound):
        store.append_messages(engine, conversation, [], tenant_id=other.id)
    with pytest.raises(store.InvalidState):
        store.create_conversation(engine, other.id, conversation_id=conversation)
    with pytest.raises(store.ConversationNotFound):
        store.load_conversation(engine, "conv_missing")
