"""exact_billing: prices and costs as exact decimals; discarded_answers, the paid answers no result kept

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# store.tables.PRICE_SCALE and COST_SCALE as of this revision (a migration never imports the models).
_PRICE = sa.Numeric(18, 6)
_COST = sa.Numeric(24, 12)
_PRICE_COLUMNS = ("input_per_million", "cached_input_per_million", "output_per_million")


def _retype(table: str, columns: Sequence[str], to: sa.Numeric[Decimal], scale: int, nullable: bool) -> None:
    # Floats already stored are rounded to the new scale: what they were meant to be.
    postgres = op.get_bind().dialect.name == "postgresql"
    with op.batch_alter_table(table, schema=None) as batch_op:
        for column in columns:
            batch_op.alter_column(
                column,
                existing_type=sa.Float(),
                type_=to,
                existing_nullable=nullable,
                postgresql_using=f"round({column}::numeric, {scale})" if postgres else None,
            )


def _back_to_float(table: str, columns: Sequence[str], was: sa.Numeric[Decimal], nullable: bool) -> None:
    with op.batch_alter_table(table, schema=None) as batch_op:
        for column in columns:
            batch_op.alter_column(column, existing_type=was, type_=sa.Float(), existing_nullable=nullable)


def upgrade() -> None:
    _retype("model_prices", _PRICE_COLUMNS, _PRICE, 6, nullable=False)
    _retype("results", ("cost_usd",), _COST, 12, nullable=True)
    op.create_table(
        "discarded_answers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("upstream_request_id", sa.String(length=200), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("reasoning_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", _COST, nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["request_id"], ["requests.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "request_id", "upstream_request_id", name="uq_discarded_answers_request_id_upstream_request_id"
        ),
    )
    with op.batch_alter_table("discarded_answers", schema=None) as batch_op:
        batch_op.create_index(
            "ix_discarded_answers_tenant_id_created_at", ["tenant_id", "created_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("discarded_answers", schema=None) as batch_op:
        batch_op.drop_index("ix_discarded_answers_tenant_id_created_at")
    op.drop_table("discarded_answers")
    _back_to_float("results", ("cost_usd",), _COST, nullable=True)
    _back_to_float("model_prices", _PRICE_COLUMNS, _PRICE, nullable=False)
