"""Messages for agents run by the distributed runtime, kept in the ledger.

The sender writes the message here, then sends a Celery message naming it by id; the worker that
runs the handler reads it back. So a broker (and Flower) never holds a message's content, and a
message redelivered by Celery is read again from SQL. Writing the same id twice keeps the first:
an id names one message.

A worker *claims* a message before running its handler (a lease it extends while the handler
runs, and a delivery count), and marks it answered afterwards. An unanswered message under an
expired lease belongs to a worker that died: ``agent_messages_to_resend`` finds it for the sweeper,
which sends it again and holds it (``hold_for_resend``) so that the next sweep does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from store.clock import now_seconds
from store.engine import dialect_insert, write_transaction
from store.tables import NO_TENANT, AgentMessage

__all__ = [
    "AgentMessageToResend",
    "StoredAgentMessage",
    "agent_messages_to_resend",
    "answer_agent_message",
    "claim_agent_message",
    "extend_agent_message_lease",
    "get_agent_message",
    "hold_for_resend",
    "record_agent_message",
]


@dataclass(frozen=True)
class StoredAgentMessage:
    id: str
    agent_type: str
    agent_key: str
    sender: str | None
    payload: dict[str, Any]


def record_agent_message(
    engine: Engine,
    message_id: str,
    *,
    agent_type: str,
    agent_key: str,
    payload: Mapping[str, Any],
    sender: str | None = None,
    tenant_id: str | None = None,
) -> bool:
    """Store the message; False when one with this id was stored before (it is kept as it was)."""
    row = {
        "tenant_id": tenant_id or NO_TENANT,
        "id": message_id,
        "agent_type": agent_type,
        "agent_key": agent_key,
        "sender": sender,
        "payload": dict(payload),
        "created_at": now_seconds(),
    }
    with write_transaction(engine) as conn:
        statement = dialect_insert(conn, AgentMessage).values(row).on_conflict_do_nothing()
        # RETURNING, not rowcount: psycopg reports -1 for INSERT .. ON CONFLICT DO NOTHING.
        return conn.execute(statement.returning(AgentMessage.id)).first() is not None


def get_agent_message(
    engine: Engine, message_id: str, tenant_id: str | None = None
) -> StoredAgentMessage | None:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(
                AgentMessage.id,
                AgentMessage.agent_type,
                AgentMessage.agent_key,
                AgentMessage.sender,
                AgentMessage.payload,
            ).where(AgentMessage.tenant_id == (tenant_id or NO_TENANT), AgentMessage.id == message_id)
        ).first()
    if row is None:
        return None
    return StoredAgentMessage(row.id, row.agent_type, row.agent_key, row.sender, dict(row.payload))


def _this(message_id: str, tenant_id: str | None) -> sa.ColumnElement[bool]:
    return sa.and_(AgentMessage.tenant_id == (tenant_id or NO_TENANT), AgentMessage.id == message_id)


def claim_agent_message(
    engine: Engine,
    message_id: str,
    tenant_id: str | None,
    owner: str,
    lease_seconds: int,
    now: int | None = None,
) -> int | None:
    """Lease an unanswered message not leased to a live worker; returns its delivery count
    (this one included), None when it is answered or someone else holds it."""
    now = now if now is not None else now_seconds()
    with write_transaction(engine) as conn:
        return conn.execute(
            sa.update(AgentMessage)
            .where(
                _this(message_id, tenant_id),
                AgentMessage.answered_at.is_(None),
                sa.or_(
                    AgentMessage.lease_expires_at.is_(None),
                    AgentMessage.lease_expires_at < now,
                    AgentMessage.lease_owner.is_(None),
                ),
            )
            .values(
                lease_owner=owner, lease_expires_at=now + lease_seconds, attempts=AgentMessage.attempts + 1
            )
            .returning(AgentMessage.attempts)
        ).scalar_one_or_none()


def extend_agent_message_lease(
    engine: Engine, message_id: str, tenant_id: str | None, owner: str, lease_seconds: int
) -> bool:
    """Push the lease of a message ``owner`` holds; False when it no longer does."""
    with write_transaction(engine) as conn:
        row = conn.execute(
            sa.update(AgentMessage)
            .where(_this(message_id, tenant_id), AgentMessage.lease_owner == owner)
            .values(lease_expires_at=now_seconds() + lease_seconds)
            .returning(AgentMessage.id)
        ).first()
    return row is not None


def answer_agent_message(
    engine: Engine, message_id: str, tenant_id: str | None, now: int | None = None
) -> None:
    """The message was answered (its reply saved with the agent's state): nothing brings it back."""
    with write_transaction(engine) as conn:
        mark_answered(conn, message_id, tenant_id, now if now is not None else now_seconds())


def mark_answered(conn: Connection, message_id: str, tenant_id: str | None, now: int) -> None:
    """``answer_agent_message`` in the caller's transaction (the one that saves the reply)."""
    conn.execute(
        sa.update(AgentMessage)
        .where(_this(message_id, tenant_id), AgentMessage.answered_at.is_(None))
        .values(answered_at=now, lease_owner=None, lease_expires_at=None)
    )


@dataclass(frozen=True)
class AgentMessageToResend:
    id: str
    tenant_id: str | None
    agent_type: str
    agent_key: str


def agent_messages_to_resend(engine: Engine, *, now: int, limit: int) -> list[AgentMessageToResend]:
    """Unanswered messages whose lease expired: their worker died mid-handler."""
    query = (
        sa.select(AgentMessage.id, AgentMessage.tenant_id, AgentMessage.agent_type, AgentMessage.agent_key)
        .where(AgentMessage.answered_at.is_(None), AgentMessage.lease_expires_at < now)
        .order_by(AgentMessage.lease_expires_at)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [
            AgentMessageToResend(row.id, row.tenant_id or None, row.agent_type, row.agent_key)
            for row in conn.execute(query)
        ]


def hold_for_resend(
    engine: Engine, message: AgentMessageToResend, hold_seconds: int, now: int | None = None
) -> bool:
    """Lease the message to no worker for ``hold_seconds`` (a worker that takes the message sent
    again claims it at once); False when it was answered or claimed meanwhile."""
    now = now if now is not None else now_seconds()
    with write_transaction(engine) as conn:
        row = conn.execute(
            sa.update(AgentMessage)
            .where(
                _this(message.id, message.tenant_id),
                AgentMessage.answered_at.is_(None),
                AgentMessage.lease_expires_at < now,
            )
            .values(lease_owner=None, lease_expires_at=now + hold_seconds)
            .returning(AgentMessage.id)
        ).first()
    return row is not None
