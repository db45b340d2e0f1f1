"""Completion webhooks: which ended batches still owe one, and what each attempt did.

Delivery is at least once: a batch owes its webhook from the moment it ends until an attempt
succeeds or ``max_attempts`` have failed; ``workers.webhooks`` retries with exponential backoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from store.batch_lifecycle import ENDED_STATUSES, batch_object
from store.clock import now_seconds
from store.engine import write_transaction
from store.tables import Batch
from store.tenants import webhook_secret

__all__ = ["DueWebhook", "claim_due_webhooks", "record_webhook_attempt"]


@dataclass(frozen=True)
class DueWebhook:
    batch_id: str
    tenant_id: str  # whose webhook: a tenant's hosts share its part of the look-ups (workers.webhooks)
    url: str
    attempts: int
    batch: dict[str, Any]  # the batch object as read (store.batch_object): the event's data
    secret: str  # the tenant's webhook secret, which signs the delivery


def _is_due(now: int) -> sa.ColumnElement[bool]:
    return sa.or_(Batch.webhook_next_at.is_(None), Batch.webhook_next_at <= now)


def claim_due_webhooks(
    engine: Engine, *, max_attempts: int, claim_seconds: int, now: int | None = None, limit: int = 100
) -> list[DueWebhook]:
    """Ended batches whose webhook is not delivered yet and whose next attempt is due, each claimed
    for ``claim_seconds`` (not due again meanwhile) so that two senders never take the same one."""
    now = now if now is not None else now_seconds()
    # The tenants in turn: each one's oldest first, and in creation order within a second (ids
    # are time-ordered). Oldest first whoever's, a tenant with more due webhooks than a pass takes,
    # at receivers that never answer, filled every pass, and others' waited behind all of them.
    turn = (
        sa.func.row_number()
        .over(partition_by=Batch.tenant_id, order_by=(Batch.created_at, Batch.id))
        .label("turn")
    )
    due = (
        sa.select(Batch.id, Batch.created_at, turn)
        .where(
            Batch.webhook_url.is_not(None),
            Batch.webhook_delivered_at.is_(None),
            Batch.status.in_(sorted(ENDED_STATUSES)),
            Batch.webhook_attempts < max_attempts,
            _is_due(now),
        )
        .subquery()
    )
    candidates = sa.select(due.c.id).order_by(due.c.turn, due.c.created_at, due.c.id).limit(limit)
    with write_transaction(engine) as conn:
        ids = list(conn.execute(candidates).scalars())
        if not ids:
            return []
        # The due condition again: of two senders racing, only one update matches each row.
        claimed = list(
            conn.execute(
                sa.update(Batch)
                .where(Batch.id.in_(ids), _is_due(now))
                .values(webhook_next_at=now + claim_seconds)
                .returning(Batch.id)
            ).scalars()
        )
    if not claimed:
        return []
    with Session(engine, expire_on_commit=False) as session:
        batches = list(
            session.scalars(
                sa.select(Batch).where(Batch.id.in_(claimed)).order_by(Batch.created_at, Batch.id)
            )
        )
    secrets = {tenant_id: webhook_secret(engine, tenant_id) for tenant_id in {b.tenant_id for b in batches}}
    return [
        DueWebhook(
            b.id,
            b.tenant_id,
            b.webhook_url or "",
            b.webhook_attempts,
            batch_object(engine, b),
            secrets[b.tenant_id],
        )
        for b in batches
    ]


def record_webhook_attempt(
    engine: Engine,
    batch_id: str,
    *,
    error: str | None,
    retry_in: int,
    now: int | None = None,
    counted: bool = True,
) -> None:
    """Count one attempt: delivered when ``error`` is None, else due again in ``retry_in`` seconds.
    The error is shown to the tenant on the batch: the caller bounds it. ``counted=False``: a
    delivery that was never attempted (nothing of the batch's doing), its count left as it was."""
    now = now if now is not None else now_seconds()
    values: dict[str, object] = {"webhook_last_error": error}
    if counted:
        values["webhook_attempts"] = Batch.webhook_attempts + 1
    if error is None:
        values["webhook_delivered_at"] = now
    else:
        values["webhook_next_at"] = now + retry_in
    with write_transaction(engine) as conn:
        conn.execute(sa.update(Batch).where(Batch.id == batch_id).values(values))
