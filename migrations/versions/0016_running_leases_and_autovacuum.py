"""requests: a partial index of the running ones; vacuumed and analyzed after a fixed number of
changed rows, not a fraction of the ledger

A refill's first look-up is for requests running under a lease that ran out, in a tenant's
batches (``store.leases.claim_in_order``). Until ANALYZE has seen a new batch, the planner
took the partial index of unfinished requests for it and read every line of the batch to find
none (82 ms at 50k lines, each refill); an index of the running requests alone, by batch and
lease expiry, is a few pages whatever the statistics say.

Every request changes several times (dispatched, claimed, lease extended, ended) and none of
these updates can be HOT (``status`` is in the partial indexes' predicate, the lease and dispatch
times are indexed), so each leaves a dead row version and dead index entries that claims and
enqueue pages step over until a vacuum removes them. PostgreSQL's defaults vacuum a table after
20% of it changed and analyze it after 10%: on a 10M-row ledger, 2M dead versions between two
vacuums, and a new million-line batch planned with statistics that have never seen it. A fixed
threshold keeps both what a claim steps over and the age of the statistics bounded however
large the ledger grows; a vacuum of the ledger then costs the pages that changed (the visibility
map skips the rest, and PostgreSQL skips index vacuuming while few pages hold dead rows).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As store.tables.RUNNING_PREDICATE and REQUESTS_AUTOVACUUM (a migration does not import the
# models it migrates).
_RUNNING = "status = 'running'"
_SETTINGS = {
    "autovacuum_vacuum_scale_factor": "0",
    "autovacuum_vacuum_threshold": "20000",
    "autovacuum_analyze_scale_factor": "0",
    "autovacuum_analyze_threshold": "50000",
}


def upgrade() -> None:
    op.create_index(
        "ix_requests_running_batch_id_lease_expires_at",
        "requests",
        ["batch_id", "lease_expires_at"],
        postgresql_where=sa.text(_RUNNING),
        sqlite_where=sa.text(_RUNNING),
    )
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite has no autovacuum settings per table
    settings = ", ".join(f"{name} = {value}" for name, value in _SETTINGS.items())
    op.execute(f"ALTER TABLE requests SET ({settings})")


def downgrade() -> None:
    op.drop_index("ix_requests_running_batch_id_lease_expires_at", table_name="requests")
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE requests RESET ({', '.join(_SETTINGS)})")
