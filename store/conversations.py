"""Agent conversations: messages (with tool calls and tool results) in order, continued by id.

Appends are idempotent per run: ``append_messages(..., run_id=R)`` records R in
``conversation_runs`` in the same transaction, so a run redone after its worker died (same request
id) appends nothing the second time, and ``load_conversation(..., before_run=R)`` reads the
conversation as that run first saw it (so its redone model calls are the same calls: cache hits).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from pydantic import TypeAdapter
from sqlalchemy.engine import Connection, Engine

from models.types import LLMMessage
from store.clock import now_seconds
from store.engine import dialect_insert, write_transaction
from store.errors import ConversationNotFound, InvalidState
from store.ids import new_id
from store.tables import Conversation, ConversationMessage, ConversationRun

__all__ = ["append_messages", "check_conversation", "create_conversation", "load_conversation"]

_MESSAGES: TypeAdapter[list[LLMMessage]] = TypeAdapter(list[LLMMessage])


def create_conversation(
    engine: Engine,
    tenant_id: str | None = None,
    messages: Sequence[LLMMessage] = (),
    *,
    conversation_id: str | None = None,
    run_id: str | None = None,
) -> str:
    """A new conversation holding ``messages``; returns its id (``conv_<hex>`` unless given).

    With a ``conversation_id`` that already exists for the same tenant (a redone run that derives
    its id from its request id), nothing is created twice: the messages are appended under
    ``run_id`` as by ``append_messages`` (so not at all if that run already appended). Another
    tenant's id raises ``InvalidState``.
    """
    conversation_id = conversation_id or new_id("conv_")
    now = now_seconds()
    with write_transaction(engine) as conn:
        created = _insert_ignoring_conflict(
            conn,
            Conversation.__table__,  # type: ignore[arg-type]
            {"id": conversation_id, "tenant_id": tenant_id, "created_at": now, "updated_at": now},
        )
        if not created:
            owner = conn.execute(
                sa.select(Conversation.tenant_id).where(Conversation.id == conversation_id).with_for_update()
            ).scalar_one()
            if owner != tenant_id:
                raise InvalidState(f"conversation {conversation_id!r} belongs to another tenant")
        _append(conn, conversation_id, messages, run_id, now)
    return conversation_id


def append_messages(
    engine: Engine,
    conversation_id: str,
    messages: Sequence[LLMMessage],
    *,
    run_id: str | None = None,
    tenant_id: str | None = None,
) -> int:
    """Append in order; returns the conversation's length. With ``run_id``, a run that already
    appended appends nothing again. Raises ConversationNotFound (also for another ``tenant_id``'s
    conversation when one is given)."""
    now = now_seconds()
    with write_transaction(engine) as conn:
        # Locking the conversation row orders concurrent appenders on PostgreSQL; SQLite's
        # write transaction is already exclusive.
        owner = conn.execute(
            sa.select(Conversation.tenant_id).where(Conversation.id == conversation_id).with_for_update()
        ).first()
        if owner is None or (tenant_id is not None and owner[0] != tenant_id):
            raise ConversationNotFound(f"no conversation {conversation_id!r}")
        return _append(conn, conversation_id, messages, run_id, now)


def check_conversation(engine: Engine, conversation_id: str, *, tenant_id: str) -> None:
    """Raise ConversationNotFound unless the tenant has this conversation: its row alone is read
    (``POST /v1/agent_runs`` loaded every message to learn this, ~0.3 s of the API's CPU per
    create for a conversation of 30,000 short messages, before any quota was checked)."""
    with engine.connect() as conn:
        owner = conn.execute(
            sa.select(Conversation.tenant_id).where(Conversation.id == conversation_id)
        ).first()
    if owner is None or owner[0] != tenant_id:
        raise ConversationNotFound(f"no conversation {conversation_id!r}")


def load_conversation(
    engine: Engine,
    conversation_id: str,
    *,
    tenant_id: str | None = None,
    before_run: str | None = None,
) -> list[LLMMessage]:
    """Every message in order; with ``before_run``, only those before that run's own messages
    (all of them if it appended none). ``tenant_id`` None reads any tenant's conversation (for
    operators); given, another tenant's conversation is not found. Raises ConversationNotFound."""
    with engine.connect() as conn:
        owner = conn.execute(
            sa.select(Conversation.tenant_id).where(Conversation.id == conversation_id)
        ).first()
        if owner is None or (tenant_id is not None and owner[0] != tenant_id):
            raise ConversationNotFound(f"no conversation {conversation_id!r}")
        query = sa.select(ConversationMessage.message).where(
            ConversationMessage.conversation_id == conversation_id
        )
        if before_run is not None:
            start = conn.execute(
                sa.select(ConversationRun.first_position).where(
                    ConversationRun.conversation_id == conversation_id, ConversationRun.run_id == before_run
                )
            ).scalar_one_or_none()
            if start is not None:
                query = query.where(ConversationMessage.position < start)
        rows = conn.execute(query.order_by(ConversationMessage.position)).scalars()
        return _MESSAGES.validate_python(list(rows))


def _insert_ignoring_conflict(conn: Connection, table: sa.Table, row: dict[str, object]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING on either dialect; True when the row was inserted."""
    statement = dialect_insert(conn, table).values(row).on_conflict_do_nothing()
    # RETURNING, not rowcount: psycopg reports -1 for some INSERT .. ON CONFLICT statements.
    first_column = next(iter(table.primary_key.columns))
    return conn.execute(statement.returning(first_column)).first() is not None


def _append(
    conn: Connection, conversation_id: str, messages: Sequence[LLMMessage], run_id: str | None, now: int
) -> int:
    """Append under the caller's lock on the conversation row; returns the new length."""
    length = int(
        conn.execute(
            sa.select(sa.func.count()).where(ConversationMessage.conversation_id == conversation_id)
        ).scalar_one()
    )
    if run_id is not None:
        recorded = _insert_ignoring_conflict(
            conn,
            ConversationRun.__table__,  # type: ignore[arg-type]
            {
                "conversation_id": conversation_id,
                "run_id": run_id,
                "first_position": length,
                "message_count": len(messages),
                "created_at": now,
            },
        )
        if not recorded:
            return length
    if messages:
        conn.execute(
            sa.insert(ConversationMessage),
            [
                {
                    "conversation_id": conversation_id,
                    "position": length + offset,
                    "message": message.model_dump(mode="json"),
                    "created_at": now,
                }
                for offset, message in enumerate(messages)
            ],
        )
        conn.execute(sa.update(Conversation).where(Conversation.id == conversation_id).values(updated_at=now))
    return length + len(messages)
