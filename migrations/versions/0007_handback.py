"""requests.handed_back_attempts, requests.retry_deadline: a request a worker put back in line for
rate limits keeps the count of the upstream attempts made so far, and the time its rate-limit
retries stop

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("handed_back_attempts", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("retry_deadline", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("retry_deadline")
        batch.drop_column("handed_back_attempts")
