"""tenants.weight (fair scheduling) and an index of the unfinished requests of a batch

The weight is a tenant's share of the workers when tenants' work waits (``workers.fair_share``).
The partial index holds only queued and running rows, in line order per batch: a fair claim
(``store.leases.claim_in_order``) walks a batch's unfinished rows, never its finished ones, so it
stays cheap when most of a big batch is done.

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

_UNFINISHED = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("weight", sa.Float(), nullable=False, server_default="1"))
    op.create_index(
        "ix_requests_unfinished_batch_id_line_number",
        "requests",
        ["batch_id", "line_number"],
        postgresql_where=_UNFINISHED,
        sqlite_where=_UNFINISHED,
    )


def downgrade() -> None:
    op.drop_index("ix_requests_unfinished_batch_id_line_number", table_name="requests")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("weight")
