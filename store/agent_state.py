"""Agents' saved state, by ``AgentId`` (type + key) and tenant, for the distributed runtime.

A worker loads an agent's state before its handler runs and saves it after. Each save bumps
``version``; a save given ``expected_version`` fails with ``AgentStateConflict`` when another save
came in between (two workers handling the same agent at once), so an update is never lost
silently. A save may also record the id of the message it answered and its reply, so that a
message delivered twice (Celery redelivers after a worker died) is answered from SQL instead of
running its handler a second time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.agent_messages import mark_answered
from store.clock import now_seconds
from store.engine import dialect_insert, write_transaction
from store.errors import AgentStateConflict
from store.tables import NO_TENANT, AgentState

__all__ = ["StoredAgentState", "get_agent_state", "load_agent_state", "save_agent_state"]


@dataclass(frozen=True)
class StoredAgentState:
    state: dict[str, Any]
    version: int
    last_message_id: str | None
    last_reply: dict[str, Any] | None


def _key(agent_type: str, agent_key: str, tenant_id: str | None) -> sa.ColumnElement[bool]:
    return sa.and_(
        AgentState.tenant_id == (tenant_id or NO_TENANT),
        AgentState.agent_type == agent_type,
        AgentState.agent_key == agent_key,
    )


def get_agent_state(
    engine: Engine, agent_type: str, agent_key: str, tenant_id: str | None = None
) -> StoredAgentState | None:
    """The stored state with its version and last answered message, or None if never saved."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(
                AgentState.state, AgentState.version, AgentState.last_message_id, AgentState.last_reply
            ).where(_key(agent_type, agent_key, tenant_id))
        ).first()
    if row is None:
        return None
    return StoredAgentState(dict(row.state), int(row.version), row.last_message_id, row.last_reply)


def load_agent_state(
    engine: Engine, agent_type: str, agent_key: str, tenant_id: str | None = None
) -> dict[str, Any] | None:
    """The state last saved for this agent, or None."""
    stored = get_agent_state(engine, agent_type, agent_key, tenant_id)
    return None if stored is None else stored.state


def save_agent_state(
    engine: Engine,
    agent_type: str,
    agent_key: str,
    state: Mapping[str, Any],
    tenant_id: str | None = None,
    *,
    expected_version: int | None = None,
    message_id: str | None = None,
    reply: Mapping[str, Any] | None = None,
) -> int:
    """Insert or replace the agent's state; returns its new version (1 for the first save).

    ``expected_version``: the version that was loaded (0 = none was saved); a mismatch raises
    ``AgentStateConflict`` and writes nothing. ``message_id`` (with its ``reply``) is the agent
    message this save answers: it is marked answered in the same transaction.
    """
    now = now_seconds()
    values: dict[str, Any] = {
        "state": dict(state),
        "last_message_id": message_id,
        "last_reply": dict(reply) if reply is not None else None,
        "updated_at": now,
    }
    with write_transaction(engine) as conn:
        if message_id is not None:
            # Answered with the save that holds its reply: no crash between the two can bring the
            # message back to be run again. A conflict below rolls this back too.
            mark_answered(conn, message_id, tenant_id, now)
        if expected_version is not None and expected_version > 0:
            updated = conn.execute(
                sa.update(AgentState)
                .where(_key(agent_type, agent_key, tenant_id), AgentState.version == expected_version)
                .values(version=AgentState.version + 1, **values)
            ).rowcount
            if updated != 1:
                name = f"{agent_type}/{agent_key}"
                raise AgentStateConflict(
                    f"agent {name} was saved by another writer since version {expected_version}"
                )
            return expected_version + 1
        row = {
            "tenant_id": tenant_id or NO_TENANT,
            "agent_type": agent_type,
            "agent_key": agent_key,
            "version": 1,
            **values,
        }
        insert = dialect_insert(conn, AgentState).values(row)
        if expected_version == 0:
            # RETURNING, not rowcount: psycopg reports -1 for INSERT .. ON CONFLICT DO NOTHING.
            inserted = conn.execute(insert.on_conflict_do_nothing().returning(AgentState.version)).first()
            if inserted is None:
                raise AgentStateConflict(f"agent {agent_type}/{agent_key} was saved by someone else first")
            return 1
        version = conn.execute(
            insert.on_conflict_do_update(
                index_elements=["tenant_id", "agent_type", "agent_key"],
                set_={"version": AgentState.version + 1, **values},
            ).returning(AgentState.version)
        ).scalar_one()
        return int(version)
