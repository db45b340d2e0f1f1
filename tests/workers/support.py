"""Helpers of the worker tests: a ledger with a batch in it, and what the ledger then says."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store import (
    Request,
    Result,
    create_tenant,
    ingest_batch,
    make_engine,
    pending_request_ids,
    upgrade_to_head,
)


@dataclass
class Ledger:
    engine: Engine
    tenant_id: str


def ledger(url: str) -> Ledger:
    upgrade_to_head(url)
    engine = make_engine(url)
    return Ledger(engine, create_tenant(engine, "test").id)


def add_batch(led: Ledger, prompts: Sequence[str], *, model: str = "sim-model") -> tuple[str, list[str]]:
    """A batch of short-form lines; returns its id and its request ids in line order."""
    lines = "\n".join(json.dumps({"custom_id": f"r{i}", "prompt": p}) for i, p in enumerate(prompts))
    report = ingest_batch(
        led.engine, io.BytesIO(lines.encode()), tenant_id=led.tenant_id, defaults={"model": model}
    )
    assert report.accepted == len(prompts), report
    return report.batch_id, pending_request_ids(led.engine, report.batch_id)


def results_of(engine: Engine, batch_id: str) -> list[Result]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(Result).where(Result.batch_id == batch_id)).all())  # type: ignore[arg-type]


def statuses(engine: Engine, batch_id: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(Request.status, sa.func.count())
            .where(Request.batch_id == batch_id)
            .group_by(Request.status)
        ).all()
    return {str(row[0].value if hasattr(row[0], "value") else row[0]): int(row[1]) for row in rows}
