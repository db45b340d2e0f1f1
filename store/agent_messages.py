"""Messages for agents run by the distributed runtime, kept in the ledger.

The sender writes the message here, then sends a Celery message naming it by id; the worker that
runs the handler reads it back. So a broker (and Flower) never holds a message's content, and a
message redelivered by Celery is read again from SQL. Writing the same id twice keeps the first:
an id names one message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.engine import dialect_insert, write_transaction
from store.ids import now_seconds
from store.tables import NO_TENANT, AgentMessage

__all__ = ["StoredAgentMessage", "get_agent_message", "record_agent_message"]


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
