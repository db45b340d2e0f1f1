"""Partial indexes on the requests still to run; a batch's billed counters; discarded answers by batch

Claims, enqueue, progress and the sweeper read the requests still queued or running; on the full
(batch_id, line_number) index they stepped over every line a batch had already done, so a
million-line batch slowed as it ran (bench/query_plans.py). Every read of a batch summed its
results for its usage (and its discarded answers with a sequential scan): the batch now keeps
those sums, filled here from the rows already written.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As store.tables.UNFINISHED_PREDICATE (a migration does not import the models it migrates).
_UNFINISHED = "status IN ('queued', 'running')"


_COUNTERS = (
    "billed_prompt_tokens",
    "billed_cached_prompt_tokens",
    "billed_completion_tokens",
    "billed_reasoning_tokens",
)
_TOKENS = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "reasoning_tokens")


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        for name in _COUNTERS:
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("billed_cost_usd", sa.Numeric(24, 12), nullable=False, server_default="0"))
        batch.add_column(sa.Column("cache_hits", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("discarded_answer_count", sa.Integer(), nullable=False, server_default="0")
        )
    # The sums of what was written before this revision, as store.usage sums them.
    billed = ", ".join(f"SUM(CASE WHEN NOT cached THEN {name} ELSE 0 END) AS {name}" for name in _TOKENS)
    op.execute(
        "UPDATE batches SET "
        + ", ".join(f"billed_{name} = s.{name}" for name in _TOKENS)
        + ", billed_cost_usd = s.cost, cache_hits = s.hits FROM (SELECT batch_id, "
        + billed
        + ", COALESCE(SUM(CASE WHEN NOT cached THEN cost_usd END), 0) AS cost, "
        "SUM(CASE WHEN cached THEN 1 ELSE 0 END) AS hits FROM results GROUP BY batch_id) AS s "
        "WHERE batches.id = s.batch_id"
    )
    op.execute(
        "UPDATE batches SET "
        + ", ".join(f"billed_{name} = billed_{name} + s.{name}" for name in _TOKENS)
        + ", billed_cost_usd = billed_cost_usd + s.cost, discarded_answer_count = s.answers "
        "FROM (SELECT batch_id, "
        + ", ".join(f"SUM({name}) AS {name}" for name in _TOKENS)
        + ", COALESCE(SUM(cost_usd), 0) AS cost, COUNT(*) AS answers FROM discarded_answers "
        "GROUP BY batch_id) AS s WHERE batches.id = s.batch_id"
    )
    for name, columns in (
        ("ix_requests_unfinished_batch_id_line_number", ["batch_id", "line_number"]),
        ("ix_requests_unfinished_dispatch_id", ["dispatch_id"]),
    ):
        op.create_index(
            name,
            "requests",
            columns,
            postgresql_where=sa.text(_UNFINISHED),
            sqlite_where=sa.text(_UNFINISHED),
        )
    op.create_index("ix_discarded_answers_batch_id", "discarded_answers", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_discarded_answers_batch_id", table_name="discarded_answers")
    op.drop_index("ix_requests_unfinished_dispatch_id", table_name="requests")
    op.drop_index("ix_requests_unfinished_batch_id_line_number", table_name="requests")
    with op.batch_alter_table("batches") as batch:
        for name in (*_COUNTERS, "billed_cost_usd", "cache_hits", "discarded_answer_count"):
            batch.drop_column(name)
