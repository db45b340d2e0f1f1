"""Logins to the dashboard (``/ui``): opaque tokens, of which the ledger keeps only the SHA-256.

A browser logs in once with an API key and then holds a session token in a cookie, never the key.
The token is random (256 bits), so a fast hash is enough, as for keys. A session ends at its
expiry, at logout (its row is deleted, so a copied cookie stops working at once) or when its key
is revoked. Each key keeps at most ``MAX_SESSIONS_PER_KEY`` sessions (the oldest go first) and
every login deletes expired ones, so logging in in a loop cannot grow the table ("everything
bounded").
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.clock import now_seconds
from store.engine import write_transaction
from store.tables import ApiKey, DashboardSession, Tenant
from store.tenants import find_api_key

__all__ = [
    "MAX_SESSIONS_PER_KEY",
    "DashboardLogin",
    "close_dashboard_session",
    "dashboard_session",
    "open_dashboard_session",
]

MAX_SESSIONS_PER_KEY = 20


@dataclass(frozen=True, slots=True)
class DashboardLogin:
    """A live session: who it is, and the token its forms must send back."""

    tenant_id: str
    tenant_name: str
    api_key_id: str
    csrf_token: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class OpenedSession:
    token: str  # for the cookie; not kept anywhere else
    login: DashboardLogin


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def open_dashboard_session(
    engine: Engine, api_key: str, ttl_seconds: int, now: int | None = None
) -> OpenedSession | None:
    """A new session for the live key ``api_key``, or None when the key is unknown or revoked."""
    key = find_api_key(engine, api_key)
    if key is None:
        return None
    now = now if now is not None else now_seconds()
    token = secrets.token_urlsafe(32)
    csrf_token = secrets.token_urlsafe(32)
    expires_at = now + ttl_seconds
    with write_transaction(engine) as conn:
        conn.execute(sa.delete(DashboardSession).where(DashboardSession.expires_at <= now))
        keep = (
            sa.select(DashboardSession.token_hash)
            .where(DashboardSession.api_key_id == key.id)
            .order_by(DashboardSession.created_at.desc(), DashboardSession.token_hash)
            .limit(MAX_SESSIONS_PER_KEY - 1)
        )
        conn.execute(
            sa.delete(DashboardSession).where(
                DashboardSession.api_key_id == key.id, DashboardSession.token_hash.not_in(keep)
            )
        )
        conn.execute(
            sa.insert(DashboardSession).values(
                token_hash=_hash_token(token),
                api_key_id=key.id,
                tenant_id=key.tenant_id,
                csrf_token=csrf_token,
                created_at=now,
                expires_at=expires_at,
            )
        )
        tenant_name = conn.execute(sa.select(Tenant.name).where(Tenant.id == key.tenant_id)).scalar_one()
    return OpenedSession(token, DashboardLogin(key.tenant_id, tenant_name, key.id, csrf_token, expires_at))


def dashboard_session(engine: Engine, token: str, now: int | None = None) -> DashboardLogin | None:
    """The live session whose token is ``token``: not expired, its key not revoked; else None."""
    now = now if now is not None else now_seconds()
    query = (
        sa.select(
            DashboardSession.tenant_id,
            Tenant.name,
            DashboardSession.api_key_id,
            DashboardSession.csrf_token,
            DashboardSession.expires_at,
        )
        .join(ApiKey, ApiKey.id == DashboardSession.api_key_id)
        .join(Tenant, Tenant.id == DashboardSession.tenant_id)
        .where(
            DashboardSession.token_hash == _hash_token(token),
            DashboardSession.expires_at > now,
            ApiKey.revoked_at.is_(None),
        )
    )
    with engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        return None
    return DashboardLogin(row[0], row[1], row[2], row[3], row[4])


def close_dashboard_session(engine: Engine, token: str) -> bool:
    """Log out: the session is deleted; False when there was none."""
    with write_transaction(engine) as conn:
        result = conn.execute(
            sa.delete(DashboardSession).where(DashboardSession.token_hash == _hash_token(token))
        )
        return result.rowcount > 0
