"""Tenants and their API keys. A key is shown once at creation; only its SHA-256 is stored (keys
are 256-bit random, so a fast hash is enough: there is nothing to brute-force)."""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import secrets
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from store.clock import now_seconds
from store.engine import autocommit_connection, write_transaction
from store.errors import InvalidArgument, NotFound
from store.ids import new_id
from store.tables import ApiKey, Tenant

__all__ = [
    "API_KEY_PREFIX",
    "MAX_TENANT_WEIGHT",
    "MIN_TENANT_WEIGHT",
    "WEBHOOK_SECRET_PREFIX",
    "api_key_hash",
    "authenticate_api_key",
    "create_api_key",
    "create_tenant",
    "find_api_key",
    "get_tenant",
    "live_key_owner",
    "new_webhook_secret",
    "revoke_api_key",
    "set_tenant_weight",
    "tenant_weight",
    "webhook_secret",
]

API_KEY_PREFIX = "tm-"
WEBHOOK_SECRET_PREFIX = "whsec_"


def api_key_hash(key: str) -> str:
    """What the ledger keeps of an API key (``api_keys.key_hash``): never the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def create_tenant(engine: Engine, name: str, tenant_id: str | None = None) -> Tenant:
    tenant = Tenant(
        id=tenant_id or new_id("tenant_"),
        name=name,
        created_at=now_seconds(),
        webhook_secret=new_webhook_secret(),
        weight=1.0,
    )
    with write_transaction(engine) as conn:
        conn.execute(
            sa.insert(Tenant),
            {
                "id": tenant.id,
                "name": tenant.name,
                "created_at": tenant.created_at,
                "webhook_secret": tenant.webhook_secret,
            },
        )
    return tenant


def webhook_secret(engine: Engine, tenant_id: str, *, rotate: bool = False) -> str:
    """The secret that signs the tenant's webhooks; a new one (from now on) with ``rotate``, or
    when the tenant has none. Raises ``NotFound`` for an unknown tenant."""
    with write_transaction(engine) as conn:
        current = conn.execute(
            sa.select(Tenant.id, Tenant.webhook_secret).where(Tenant.id == tenant_id)
        ).one_or_none()
        if current is None:
            raise NotFound(f"no tenant {tenant_id!r}")
        if current.webhook_secret and not rotate:
            return str(current.webhook_secret)
        secret = new_webhook_secret()
        conn.execute(sa.update(Tenant).where(Tenant.id == tenant_id).values(webhook_secret=secret))
    return secret


# Bounded so that no share rounds to nothing next to another: 1,000 to 1 is already a tenant that
# waits while the other has work.
MAX_TENANT_WEIGHT = 1000.0
# Shares go by 1 / weight: a far smaller weight pushes the schedulers' clocks to where every other
# tenant's step rounds to nothing (workers.fair_share steps by at most 1 / this, for rows older
# than the check).
MIN_TENANT_WEIGHT = 0.001


def set_tenant_weight(engine: Engine, tenant_id: str, weight: float) -> None:
    """Set the tenant's share of the workers (``workers.fair_share``): a tenant of weight 2 gets
    twice the requests started of a tenant of weight 1 while both have work waiting. Raises
    ``InvalidArgument`` (code ``invalid_weight``) unless ``MIN_TENANT_WEIGHT`` <= weight <=
    ``MAX_TENANT_WEIGHT``, and ``NotFound`` for an unknown tenant."""
    if not (math.isfinite(weight) and MIN_TENANT_WEIGHT <= weight <= MAX_TENANT_WEIGHT):
        raise InvalidArgument(
            f"a tenant's weight is a number from {MIN_TENANT_WEIGHT:g} to {MAX_TENANT_WEIGHT:g}, "
            f"not {weight!r}",
            "weight",
            code="invalid_weight",
        )
    with write_transaction(engine) as conn:
        updated = conn.execute(sa.update(Tenant).where(Tenant.id == tenant_id).values(weight=weight))
        if updated.rowcount == 0:
            raise NotFound(f"no tenant {tenant_id!r}")


def tenant_weight(engine: Engine, tenant_id: str) -> float:
    """The tenant's weight; raises ``NotFound`` for an unknown tenant."""
    with engine.connect() as conn:
        weight = conn.execute(sa.select(Tenant.weight).where(Tenant.id == tenant_id)).scalar_one_or_none()
    if weight is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    return float(weight)


def get_tenant(engine: Engine, tenant_id: str) -> Tenant | None:
    with Session(engine, expire_on_commit=False) as session:
        return session.get(Tenant, tenant_id)


def create_api_key(engine: Engine, tenant_id: str, name: str | None = None) -> str:
    """A new key for the tenant; the plaintext is returned here and never again."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    with write_transaction(engine) as conn:
        conn.execute(
            sa.insert(ApiKey),
            {
                "id": new_id("key_"),
                "tenant_id": tenant_id,
                "key_hash": api_key_hash(key),
                "prefix": key[:10],
                "name": name,
                "created_at": now_seconds(),
            },
        )
    return key


def live_key_owner(*columns: Any) -> sa.Select[Any]:
    """``columns`` (of ``tenants``) of the owner of a live (not revoked) key whose hash is the
    parameter ``key_hash`` (``api_key_hash``): no row for a key unknown or revoked."""
    return (
        sa.select(*columns)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == sa.bindparam("key_hash"), ApiKey.revoked_at.is_(None))
        .limit(1)
    )


@functools.cache
def _key_owner_query() -> sa.Select[Any]:
    """``live_key_owner``'s whole tenant row: built once, since building and hashing the statement
    cost more CPU than running it (py-spy, bench/sync_latency.py)."""
    return live_key_owner(*Tenant.__table__.columns)


def authenticate_api_key(engine: Engine, key: str) -> Tenant | None:
    """The tenant owning ``key``, or None when the key is unknown or revoked. A transient
    ``Tenant`` made from the row (no session, nothing loads lazily): read it, never add it to a
    session."""
    # On every API request: one statement, no transaction around it, no ORM session.
    with autocommit_connection(engine) as conn:
        row = conn.execute(_key_owner_query(), {"key_hash": api_key_hash(key)}).first()
    return None if row is None else Tenant(**row._mapping)


def find_api_key(engine: Engine, key: str) -> ApiKey | None:
    """The live (not revoked) key row whose plaintext is ``key``, or None."""
    query = sa.select(ApiKey).where(ApiKey.key_hash == api_key_hash(key), ApiKey.revoked_at.is_(None))
    with Session(engine, expire_on_commit=False) as session:
        return session.scalars(query).first()


def revoke_api_key(engine: Engine, key_or_id: str) -> bool:
    """Revoke by plaintext key or by key id; False when no live key matched."""
    with write_transaction(engine) as conn:
        result = conn.execute(
            sa.update(ApiKey)
            .where(
                sa.or_(ApiKey.key_hash == api_key_hash(key_or_id), ApiKey.id == key_or_id),
                ApiKey.revoked_at.is_(None),
            )
            .values(revoked_at=now_seconds())
        )
        return result.rowcount > 0
