"""tenants.weight (fair scheduling) and an index of the queued requests of each batch

The weight is a tenant's share of the workers when tenants' work waits (``workers.fair_share``).
The partial index holds only queued rows, in line order per batch: a fair claim
(``store.leases.claim_in_order``) reads a batch's next queued rows, never its finished ones nor
other batches' queued ones, so it stays cheap when most of a big batch is done. (On a large
table, build it first with ``CREATE INDEX CONCURRENTLY`` under the same name: this migration
then finds it in place.)

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

_QUEUED = sa.text("status = 'queued'")


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("weight", sa.Float(), nullable=False, server_default="1"))
    op.create_index(
        "ix_requests_queued_batch_id_line_number",
        "requests",
        ["batch_id", "line_number"],
        postgresql_where=_QUEUED,
        sqlite_where=_QUEUED,
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_index("ix_requests_queued_batch_id_line_number", table_name="requests")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("weight")
