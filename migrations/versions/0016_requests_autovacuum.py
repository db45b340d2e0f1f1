"""requests: vacuumed and analyzed after a fixed number of changed rows, not a fraction of the ledger

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

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As store.tables.REQUESTS_AUTOVACUUM (a migration does not import the models it migrates).
_SETTINGS = {
    "autovacuum_vacuum_scale_factor": "0",
    "autovacuum_vacuum_threshold": "20000",
    "autovacuum_analyze_scale_factor": "0",
    "autovacuum_analyze_threshold": "50000",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite has no autovacuum settings per table
    settings = ", ".join(f"{name} = {value}" for name, value in _SETTINGS.items())
    op.execute(f"ALTER TABLE requests SET ({settings})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE requests RESET ({', '.join(_SETTINGS)})")
