"""tenants' quotas (queued requests, queued tokens, daily budget) and what checking them reads

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as tenants:
        tenants.add_column(sa.Column("max_queued_requests", sa.BigInteger(), nullable=True))
        tenants.add_column(sa.Column("max_queued_tokens", sa.BigInteger(), nullable=True))
        tenants.add_column(sa.Column("daily_budget_usd", sa.Numeric(18, 6), nullable=True))
    with op.batch_alter_table("batches") as batches:
        batches.add_column(
            sa.Column("prompt_tokens_estimate", sa.BigInteger(), nullable=False, server_default="0")
        )
    op.create_index("ix_batches_tenant_id_status", "batches", ["tenant_id", "status"])
    op.create_table(
        "tenant_daily_spend",
        sa.Column("tenant_id", sa.String(64), primary_key=True),
        sa.Column("day", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("cost_usd", sa.Numeric(24, 12), nullable=False),
    )
    # Today's spend so far, so a budget set today counts what was billed before this upgrade.
    today = int(time.time()) // 86_400
    op.execute(
        sa.text(
            "INSERT INTO tenant_daily_spend (tenant_id, day, cost_usd) "
            "SELECT tenant_id, :day, SUM(cost_usd) FROM ("
            "SELECT tenant_id, cost_usd FROM results WHERE created_at >= :since AND cost_usd IS NOT NULL "
            "UNION ALL SELECT tenant_id, cost_usd FROM discarded_answers "
            "WHERE created_at >= :since AND cost_usd IS NOT NULL) AS spend GROUP BY tenant_id"
        ).bindparams(day=today, since=today * 86_400)
    )


def downgrade() -> None:
    op.drop_table("tenant_daily_spend")
    op.drop_index("ix_batches_tenant_id_status", table_name="batches")
    with op.batch_alter_table("batches") as batches:
        batches.drop_column("prompt_tokens_estimate")
    with op.batch_alter_table("tenants") as tenants:
        tenants.drop_column("daily_budget_usd")
        tenants.drop_column("max_queued_tokens")
        tenants.drop_column("max_queued_requests")
