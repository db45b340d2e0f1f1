"""Idempotency keys: a POST retried with the same ``Idempotency-Key`` gets the first answer again.

A key belongs to a tenant. The first request with it claims the key (a row with the request's
hash and no answer yet); when answered, the answer is stored on the row. A later request with the
key then finds: the answer (same hash: replay it), another request's hash (refused), or a request
still being answered (refused until it ends, or taken over once it is older than ``stale_before``:
its process died). Rows older than the retention are deleted and count as absent.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.engine import dialect_insert, write_transaction
from store.tables import IdempotencyKey

__all__ = [
    "IdempotencyClaim",
    "IdempotencyOutcome",
    "StoredResponse",
    "abandon_idempotency_key",
    "claim_idempotency_key",
    "purge_idempotency_keys",
    "store_idempotent_response",
]


class IdempotencyOutcome(enum.Enum):
    PROCEED = "proceed"  # the key is this request's now: run it, then store its answer
    REPLAY = "replay"  # answered before: send ``response`` again
    MISMATCH = "mismatch"  # the key was used for another request
    IN_PROGRESS = "in_progress"  # a request with this key is being answered right now


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class IdempotencyClaim:
    outcome: IdempotencyOutcome
    response: StoredResponse | None = None


def claim_idempotency_key(
    engine: Engine,
    tenant_id: str,
    key: str,
    request_hash: str,
    *,
    now: int,
    expired_before: int,
    stale_before: int,
) -> IdempotencyClaim:
    """Claim ``key`` for a request hashing to ``request_hash``, or say why not."""
    fresh = {
        "request_hash": request_hash,
        "status_code": None,
        "response_headers": None,
        "response_body": None,
        "created_at": now,
    }
    this_key = sa.and_(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
    # Two tries: the row the insert ran into may be deleted (``abandon_idempotency_key``) before
    # it is locked; the key is then free and the second insert takes it (or meets a newer claim).
    for _ in range(2):
        with write_transaction(engine) as conn:
            inserted = conn.execute(
                dialect_insert(conn, IdempotencyKey)
                .values(tenant_id=tenant_id, key=key, **fresh)
                .on_conflict_do_nothing()
                .returning(IdempotencyKey.key)
            ).first()
            if inserted is not None:
                return IdempotencyClaim(IdempotencyOutcome.PROCEED)
            row = conn.execute(sa.select(IdempotencyKey).where(this_key).with_for_update()).one_or_none()
            if row is None:
                continue
            answered = row.status_code is not None
            if row.created_at < expired_before or (not answered and row.created_at < stale_before):
                conn.execute(sa.update(IdempotencyKey).where(this_key).values(fresh))
                return IdempotencyClaim(IdempotencyOutcome.PROCEED)
            if row.request_hash != request_hash:
                return IdempotencyClaim(IdempotencyOutcome.MISMATCH)
            if not answered:
                return IdempotencyClaim(IdempotencyOutcome.IN_PROGRESS)
            headers = [(str(name), str(value)) for name, value in row.response_headers or []]
            return IdempotencyClaim(
                IdempotencyOutcome.REPLAY, StoredResponse(row.status_code, headers, row.response_body or b"")
            )
    # Claimed and freed twice while this one looked: another request is busy with the key.
    return IdempotencyClaim(IdempotencyOutcome.IN_PROGRESS)


def store_idempotent_response(engine: Engine, tenant_id: str, key: str, response: StoredResponse) -> None:
    with write_transaction(engine) as conn:
        conn.execute(
            sa.update(IdempotencyKey)
            .where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
            .values(
                status_code=response.status_code,
                response_headers=[list(header) for header in response.headers],
                response_body=response.body,
            )
        )


def abandon_idempotency_key(engine: Engine, tenant_id: str, key: str) -> None:
    """Free the key of a request that ended with nothing to replay: a retry runs afresh."""
    with write_transaction(engine) as conn:
        conn.execute(
            sa.delete(IdempotencyKey).where(
                IdempotencyKey.tenant_id == tenant_id,
                IdempotencyKey.key == key,
                IdempotencyKey.status_code.is_(None),
            )
        )


def purge_idempotency_keys(engine: Engine, *, older_than: int) -> int:
    """Delete the keys past their retention; returns how many."""
    with write_transaction(engine) as conn:
        deleted = conn.execute(sa.delete(IdempotencyKey).where(IdempotencyKey.created_at < older_than))
    return int(deleted.rowcount or 0)
