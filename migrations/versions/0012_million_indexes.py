"""Partial indexes on the requests still to run, and discarded answers by batch

Claims, enqueue, progress and the sweeper read the requests still queued or running; on the full
(batch_id, line_number) index they stepped over every line a batch had already done, so a
million-line batch slowed as it ran (bench/query_plans.py). The batch's usage read its discarded
answers with a sequential scan.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As store.tables.UNFINISHED_PREDICATE (a migration does not import the models it migrates).
_UNFINISHED = "status IN ('queued', 'running')"


def upgrade() -> None:
    for name, columns in (
        ("ix_requests_unfinished_batch_id_line_number", ["batch_id", "line_number"]),
        ("ix_requests_unfinished_dispatch_id", ["dispatch_id"]),
    ):
        op.create_index(
            name,
            "requests",
            columns,
            postgresql_where=sa.text(_UNFINISHED),
            sqlite_where=sa.text(_UNFINISHED),
        )
    op.create_index("ix_discarded_answers_batch_id", "discarded_answers", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_discarded_answers_batch_id", table_name="discarded_answers")
    op.drop_index("ix_requests_unfinished_dispatch_id", table_name="requests")
    op.drop_index("ix_requests_unfinished_batch_id_line_number", table_name="requests")
