"""agent_messages: a lease and an answered time, so the sweeper brings back a killed worker's message

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("agent_messages") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("lease_owner", sa.String(200), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("answered_at", sa.BigInteger(), nullable=True))
    op.create_index("ix_agent_messages_lease_expires_at", "agent_messages", ["lease_expires_at"])


def downgrade() -> None:
    op.drop_index("ix_agent_messages_lease_expires_at", table_name="agent_messages")
    with op.batch_alter_table("agent_messages") as batch:
        batch.drop_column("answered_at")
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
        batch.drop_column("attempts")
