"""An agent run as the API shows it: its request row and, once finished, its result row."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from store.tables import Request, RequestKind, Result

__all__ = ["AgentRunRecord", "get_agent_run"]


@dataclass(frozen=True)
class AgentRunRecord:
    request: Request
    result: Result | None


def get_agent_run(engine: Engine, request_id: str, tenant_id: str) -> AgentRunRecord | None:
    """The agent run ``request_id`` of ``tenant_id``; None for another tenant's or another kind's."""
    with Session(engine, expire_on_commit=False) as session:
        request = session.scalars(
            sa.select(Request).where(
                Request.id == request_id,
                Request.tenant_id == tenant_id,
                Request.kind == RequestKind.AGENT_RUN,
            )
        ).first()
        if request is None:
            return None
        result = session.get(Result, request_id)
        session.expunge_all()
        return AgentRunRecord(request, result)
