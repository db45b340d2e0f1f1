"""files.bytes: a batch's output and error files say their real size, measured when first read

A batch's output / error file row used to be written with ``bytes`` 0 (its content is generated
from the ledger when read), and the Files API reported 0. The size is now measured the first time
the file is read once its batch's requests have all finished, and kept (``store.export.with_bytes``):
None until then. The files written with 0 are measured anew.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As store.tables.FileKind's (a migration does not import the models it migrates).
_RESULT_FILES = "kind IN ('batch_output', 'batch_error')"


def upgrade() -> None:
    with op.batch_alter_table("files") as files:
        files.alter_column("bytes", existing_type=sa.BigInteger(), nullable=True)
    op.execute(f"UPDATE files SET bytes = NULL WHERE {_RESULT_FILES}")


def downgrade() -> None:
    op.execute("UPDATE files SET bytes = 0 WHERE bytes IS NULL")
    with op.batch_alter_table("files") as files:
        files.alter_column("bytes", existing_type=sa.BigInteger(), nullable=False)
