"""The two ledger operations the workers need that ``store`` has no function for (yet).

* ``batch_statuses``: one small query the runner repeats every second, to stop starting requests
  of a batch that is being cancelled or has expired.
* ``cancel_claimed``: end requests this worker holds as cancelled (their batch is cancelling), and
  finalize the batch when nothing else is left, exactly as ``store.cancel_batch`` does for the
  queued ones. Candidates to move into ``store``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store import Batch, BatchStatus, Request, RequestStatus
from store.batches import finalize_batches
from store.engine import write_transaction
from store.ids import now_seconds

__all__ = ["STOPPED_BATCH_STATUSES", "batch_statuses", "cancel_claimed"]

STOPPED_BATCH_STATUSES = frozenset(
    {BatchStatus.CANCELLING, BatchStatus.CANCELLED, BatchStatus.EXPIRED, BatchStatus.FAILED}
)


def batch_statuses(engine: Engine, batch_ids: Collection[str]) -> dict[str, BatchStatus]:
    if not batch_ids:
        return {}
    with engine.connect() as conn:
        rows = conn.execute(sa.select(Batch.id, Batch.status).where(Batch.id.in_(sorted(batch_ids)))).all()
    return {row.id: BatchStatus(row.status) for row in rows}


def cancel_claimed(engine: Engine, request_ids: Sequence[str], owner: str, now: int | None = None) -> int:
    """Cancel those of ``request_ids`` that ``owner`` still holds; returns how many."""
    if not request_ids:
        return 0
    now = now if now is not None else now_seconds()
    with write_transaction(engine) as conn:
        batch_ids = list(
            conn.execute(
                sa.update(Request)
                .where(
                    Request.id.in_(sorted(request_ids)),
                    Request.lease_owner == owner,
                    Request.status == RequestStatus.RUNNING,
                )
                .values(
                    status=RequestStatus.CANCELLED,
                    finished_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
                .returning(Request.batch_id)
            ).scalars()
        )
        per_batch: dict[str, int] = {}
        for batch_id in batch_ids:
            per_batch[batch_id] = per_batch.get(batch_id, 0) + 1
        for batch_id, count in sorted(per_batch.items()):
            conn.execute(
                sa.update(Batch)
                .where(Batch.id == batch_id)
                .values(cancelled_count=Batch.cancelled_count + count)
            )
        finalize_batches(conn, list(per_batch), now)
    return len(batch_ids)
