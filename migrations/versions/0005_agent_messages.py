"""agent_messages: the distributed agent runtime's messages, so Celery messages carry only their ids

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agent_messages",
        sa.Column("tenant_id", sa.String(64), primary_key=True),
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("agent_type", sa.String(200), nullable=False),
        sa.Column("agent_key", sa.String(500), nullable=False),
        sa.Column("sender", sa.String(800), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_agent_messages_created_at", "agent_messages", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_agent_messages_created_at", table_name="agent_messages")
    op.drop_table("agent_messages")
