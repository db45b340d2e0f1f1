"""Agent conversations: messages (with tool calls and tool results) in order, continued by id."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from pydantic import TypeAdapter
from sqlalchemy.engine import Engine

from models.types import LLMMessage
from store.engine import write_transaction
from store.errors import ConversationNotFound
from store.ids import new_id, now_seconds
from store.tables import Conversation, ConversationMessage

__all__ = ["append_messages", "create_conversation", "load_conversation"]

_MESSAGES: TypeAdapter[list[LLMMessage]] = TypeAdapter(list[LLMMessage])


def create_conversation(
    engine: Engine, tenant_id: str | None = None, messages: Sequence[LLMMessage] = ()
) -> str:
    """A new conversation holding ``messages``; returns its id (``conv_<hex>``)."""
    conversation_id = new_id("conv_")
    now = now_seconds()
    with write_transaction(engine) as conn:
        conn.execute(
            sa.insert(Conversation),
            {"id": conversation_id, "tenant_id": tenant_id, "created_at": now, "updated_at": now},
        )
        _insert(conn, conversation_id, 0, messages, now)
    return conversation_id


def append_messages(engine: Engine, conversation_id: str, messages: Sequence[LLMMessage]) -> int:
    """Append in order; returns the conversation's new length. Raises ConversationNotFound."""
    now = now_seconds()
    with write_transaction(engine) as conn:
        # Locking the conversation row orders concurrent appenders on PostgreSQL; SQLite's
        # write transaction is already exclusive.
        found = conn.execute(
            sa.select(Conversation.id).where(Conversation.id == conversation_id).with_for_update()
        ).first()
        if found is None:
            raise ConversationNotFound(f"no conversation {conversation_id!r}")
        length = conn.execute(
            sa.select(sa.func.count()).where(ConversationMessage.conversation_id == conversation_id)
        ).scalar_one()
        _insert(conn, conversation_id, length, messages, now)
        conn.execute(sa.update(Conversation).where(Conversation.id == conversation_id).values(updated_at=now))
    return int(length) + len(messages)


def load_conversation(engine: Engine, conversation_id: str) -> list[LLMMessage]:
    """Every message in order. Raises ConversationNotFound."""
    with engine.connect() as conn:
        if conn.execute(sa.select(Conversation.id).where(Conversation.id == conversation_id)).first() is None:
            raise ConversationNotFound(f"no conversation {conversation_id!r}")
        rows = conn.execute(
            sa.select(ConversationMessage.message)
            .where(ConversationMessage.conversation_id == conversation_id)
            .order_by(ConversationMessage.position)
        ).scalars()
        return _MESSAGES.validate_python(list(rows))


def _insert(
    conn: sa.Connection, conversation_id: str, start: int, messages: Sequence[LLMMessage], now: int
) -> None:
    if not messages:
        return
    conn.execute(
        sa.insert(ConversationMessage),
        [
            {
                "conversation_id": conversation_id,
                "position": start + offset,
                "message": message.model_dump(mode="json"),
                "created_at": now,
            }
            for offset, message in enumerate(messages)
        ],
    )
