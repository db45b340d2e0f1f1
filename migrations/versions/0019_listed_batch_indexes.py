"""batches: the time indexes hold the batches listed and the webhooks to send, not single calls

Every chat completion and agent run is a hidden batch of its own, kept for good. The pages of
batches (``GET /v1/batches``, the dashboard's) and the beat's look for due webhooks (every sweep)
walked the time indexes of every batch and dropped the hidden ones one by one: with a million
single calls, 250-500 ms of PostgreSQL per page and 230-320 ms per sweep. Partial indexes of the
batches listed, and of those with a webhook not yet delivered, replace them (and each single
call no longer writes two index entries that nothing reads).

The indexes are built ``CONCURRENTLY`` on PostgreSQL, outside the migration's transaction, as
0012's were: the ledger keeps taking writes while they build.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As store.tables.LISTED_PREDICATE and WEBHOOK_PENDING_PREDICATE (a migration does not import
# the models it migrates).
_LISTED = "hidden IS false"
_WEBHOOK_PENDING = "webhook_url IS NOT NULL AND webhook_delivered_at IS NULL"
_NEW = (
    ("ix_batches_listed_tenant_id_created_at_id", ["tenant_id", "created_at", "id"], _LISTED),
    ("ix_batches_listed_created_at_id", ["created_at", "id"], _LISTED),
    ("ix_batches_webhook_pending_created_at_id", ["created_at", "id"], _WEBHOOK_PENDING),
)
_OLD = (
    ("ix_batches_tenant_id_created_at_id", ["tenant_id", "created_at", "id"]),
    ("ix_batches_created_at_id", ["created_at", "id"]),
)


def _drop_invalid(names: Sequence[str]) -> None:
    """Drop what a failed ``CREATE INDEX CONCURRENTLY`` left of ``names``: an invalid index, which
    no query uses but every write keeps up, and which ``IF NOT EXISTS`` would keep for good."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    invalid = bind.execute(
        sa.text(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE NOT i.indisvalid AND c.relname = ANY(:names)"
        ),
        {"names": list(names)},
    ).scalars()
    for name in list(invalid):
        op.drop_index(name, table_name="batches", postgresql_concurrently=True, if_exists=True)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        _drop_invalid([name for name, _, _ in _NEW])
        for name, columns, predicate in _NEW:
            op.create_index(
                name,
                "batches",
                columns,
                postgresql_where=sa.text(predicate),
                sqlite_where=sa.text(predicate),
                postgresql_concurrently=True,
                if_not_exists=True,
            )
        for name, _ in _OLD:
            op.drop_index(name, table_name="batches", postgresql_concurrently=True, if_exists=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        _drop_invalid([name for name, _ in _OLD])
        for name, columns in _OLD:
            op.create_index(name, "batches", columns, postgresql_concurrently=True, if_not_exists=True)
        for name, _, _ in reversed(_NEW):
            op.drop_index(name, table_name="batches", postgresql_concurrently=True, if_exists=True)
