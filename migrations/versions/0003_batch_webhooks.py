"""completion webhook delivery state on batches

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("webhook_attempts", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("webhook_next_at", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("webhook_delivered_at", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("webhook_last_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("webhook_last_error")
        batch.drop_column("webhook_delivered_at")
        batch.drop_column("webhook_next_at")
        batch.drop_column("webhook_attempts")
