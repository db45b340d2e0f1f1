"""tenants' cap on stored file bytes, and the bytes their uploads hold now

A tenant could upload files until the files disk was full, after which every tenant's uploads
failed. ``max_stored_bytes`` is the operator's cap on one tenant's uploaded files (None: the
service default, ``TOKENMILL_DEFAULT_MAX_STORED_BYTES``); ``stored_file_bytes`` is what its
uploads hold now, kept in the transactions that add and delete them, so that checking the cap
reads one row. It starts as the sum of the uploads already kept.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as tenants:
        tenants.add_column(sa.Column("max_stored_bytes", sa.BigInteger(), nullable=True))
        tenants.add_column(
            sa.Column("stored_file_bytes", sa.BigInteger(), nullable=False, server_default="0")
        )
    # As store.tables.FileKind.UPLOAD (a migration does not import the models it migrates).
    op.execute(
        "UPDATE tenants SET stored_file_bytes = COALESCE((SELECT SUM(files.bytes) FROM files "
        "WHERE files.tenant_id = tenants.id AND files.kind = 'upload'), 0)"
    )


def downgrade() -> None:
    with op.batch_alter_table("tenants") as tenants:
        tenants.drop_column("stored_file_bytes")
        tenants.drop_column("max_stored_bytes")
